"""Task tables the tests load (DAILYQ_TASKS=tests.tables.<module>) and the functions
their tasks run. None of them is a test module."""
