"""Tests of dailyq/ops/: status views, health, metrics, eta, report, watch, text width, table skew."""
