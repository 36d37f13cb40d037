# -*- test-case-name: relaynet.test.test_logs -*-
"""
relaynet's log level.

Every relaynet module logs through a L{Logger} whose events pass one level
filter, L{observer}, on their way to Twisted's global log.  twistd writes
whatever reaches the global log, debug events included, and a busy relay
makes debug events by the thousand (one per sender offered to a listener,
...): formatting and writing them would cost more than the relaying.  So
relaynet's events below C{info} are dropped here, before anything formats
them, unless L{setLogLevel} (C{twistd relaynet --log-level debug},
C{relaynet ... --verbose}) asks for them.

Other libraries' events do not pass through this filter.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

__all__ = ["observer", "setLogLevel", "logLevel", "LEVEL_NAMES"]

#: The names L{setLogLevel} takes, lowest first.
LEVEL_NAMES = tuple(level.name for level in LogLevel.iterconstants())

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)

#: Where relaynet's loggers send their events: C{Logger(observer=observer)}.
observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def setLogLevel(level: LogLevel | str) -> None:
    """
    Let relaynet's events of C{level} and above through (C{info} unless
    set).

    @param level: a L{LogLevel}, or its name (C{"debug"}, C{"info"},
        C{"warn"}, C{"error"}, C{"critical"}).
    @raise ValueError: for a name that is no level.
    """
    if isinstance(level, str):
        if level not in LEVEL_NAMES:
            raise ValueError(f"{level!r} is not a log level; use one of {', '.join(LEVEL_NAMES)}")
        level = LogLevel.levelWithName(level)
    _predicate.setLogLevelForNamespace("relaynet", level)


def logLevel() -> LogLevel:
    """
    The lowest level of relaynet's events that is let through.
    """
    return _predicate.logLevelForNamespace("relaynet")
