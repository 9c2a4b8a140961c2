"""Helpers the tests share: real redis-server processes, node processes, a TCP proxy,
a headless browser and a webhook receiver. None of them is a test module."""
