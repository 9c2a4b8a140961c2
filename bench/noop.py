"""A no-op task in a module of its own, so a forked work-horse that imports it pays
for nothing else (the overhead benchmark)."""


def noop(param: int) -> int:
    return param
