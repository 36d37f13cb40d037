"""
Load generators for the benchmark suite.  They use the standard library only
(blocking sockets, threads, C{selectors}), so that they start fast, cost
little CPU and do not share code with the relay they measure.
"""
