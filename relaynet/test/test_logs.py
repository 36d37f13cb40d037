"""
Tests for L{relaynet.logs}: the level filter in front of relaynet's loggers.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from relaynet import logs
from relaynet.protocols import control


class LogLevelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.addCleanup(logs.setLogLevel, logs.logLevel())

    def formats(self) -> list[str]:
        return [e["log_format"] for e in self.events if e.get("log_namespace") == control.log.namespace]

    def test_info(self) -> None:
        """
        At C{info}, the level twistd and a new process start with, a
        relaynet module's debug events go nowhere and its info events reach
        the global log.
        """
        logs.setLogLevel(LogLevel.info)
        control.log.debug("quiet")
        control.log.info("heard")
        self.assertEqual(self.formats(), ["heard"])

    def test_debugOnRequest(self) -> None:
        logs.setLogLevel("debug")
        self.assertEqual(logs.logLevel(), LogLevel.debug)
        control.log.debug("heard")
        self.assertEqual(self.formats(), ["heard"])

    def test_higherLevel(self) -> None:
        """
        At C{warn}, info events are dropped as well; errors still pass.
        """
        logs.setLogLevel("warn")
        control.log.info("quiet")
        control.log.error("heard")
        self.assertEqual(self.formats(), ["heard"])

    def test_otherNamespacesUntouched(self) -> None:
        """
        The level is relaynet's: at C{error}, an event of another
        namespace that passes the same filter still gets through at info.
        """
        from twisted.logger import Logger

        logs.setLogLevel("error")
        Logger(namespace="elsewhere", observer=logs.observer).info("heard")
        self.assertEqual([e["log_format"] for e in self.events if e.get("log_namespace") == "elsewhere"], ["heard"])

    def test_unknownName(self) -> None:
        error = self.assertRaises(ValueError, logs.setLogLevel, "loud")
        self.assertIn("'loud' is not a log level", str(error))
        self.assertIn("debug, info, warn, error, critical", str(error))
