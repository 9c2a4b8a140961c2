"""Tests of dailyq/worker/: the guard, the claim watch, workers as processes."""
