# -*- test-case-name: relaynet.test.test_entities -*-
"""
Tests for L{relaynet.entities}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from relaynet.entities import MAX_NAME_LENGTH, Entity, Namespace, validEntityName
from relaynet.errors import BadRequest, EndpointNotFound


def _namespace(*names: str, **kwargs: object) -> Namespace:
    namespace = Namespace(**kwargs)  # type: ignore[arg-type]
    for name in names:
        namespace.declare(Entity(name=name))
    return namespace


class ValidEntityNameTests(SynchronousTestCase):
    def test_surroundingSlashesGo(self) -> None:
        self.assertEqual(validEntityName("/a/b/"), "a/b")
        self.assertEqual(validEntityName("hyco"), "hyco")

    def test_caseIsKept(self) -> None:
        self.assertEqual(validEntityName("HyCo"), "HyCo")

    def test_lengthLimit(self) -> None:
        self.assertEqual(validEntityName("a" * MAX_NAME_LENGTH), "a" * MAX_NAME_LENGTH)
        self.assertRaises(ValueError, validEntityName, "a" * (MAX_NAME_LENGTH + 1))

    def test_refused(self) -> None:
        for name in ["", "/", "//", "a//b", ".", "a/./b", "a/..", "$hc", "a/$b", "a?b", "a#b", "a%20b", "a\\b", "a b", "a\x01", "a\nb"]:
            with self.subTest(name=name):
                self.assertRaises(ValueError, validEntityName, name)

    def test_allowed(self) -> None:
        for name in ["a-b_c.d", "x/y/z", "a$", "caf\u00e9", "a..b", "a;b", "a:b@c"]:
            with self.subTest(name=name):
                self.assertEqual(validEntityName(name), name)


class EntityTests(SynchronousTestCase):
    def test_keyIsLowerCase(self) -> None:
        self.assertEqual(Entity(name="A/HyCo").key, "a/hyco")

    def test_defaults(self) -> None:
        entity = Entity(name="hyco")
        self.assertEqual((entity.listenerLimit, entity.anonymousSenders, entity.dynamic), (25, False, False))


class DeclareTests(SynchronousTestCase):
    def test_declareValidatesAndStrips(self) -> None:
        namespace = Namespace()
        entity = namespace.declare(Entity(name="/a/b/"))
        self.assertEqual(entity.name, "a/b")
        self.assertIs(namespace.get("A/B"), entity)
        self.assertRaises(ValueError, namespace.declare, Entity(name="a//b"))

    def test_entities(self) -> None:
        namespace = _namespace("one", "two")
        self.assertEqual(sorted(e.name for e in namespace.entities()), ["one", "two"])


class ResolveTests(SynchronousTestCase):
    """
    A sender's path goes to the longest entity name that is a prefix of it
    on a segment boundary.
    """

    def test_exactName(self) -> None:
        namespace = _namespace("hyco")
        entity, suffix = namespace.resolve("hyco")
        self.assertEqual((entity.name, suffix), ("hyco", ""))

    def test_suffixKeptExactly(self) -> None:
        namespace = _namespace("hyco")
        for path, suffix in [
            ("hyco/", "/"),
            ("hyco/Room1", "/Room1"),
            ("hyco/a/b/", "/a/b/"),
            ("hyco//x", "//x"),
            ("/hyco/x", "/x"),
        ]:
            with self.subTest(path=path):
                entity, found = namespace.resolve(path)
                self.assertEqual((entity.name, found), ("hyco", suffix))

    def test_longestPrefixWins(self) -> None:
        namespace = _namespace("a", "a/b", "a/b/c/d")
        self.assertEqual(namespace.resolve("a/b/c")[0].name, "a/b")
        self.assertEqual(namespace.resolve("a/b/c")[1], "/c")
        self.assertEqual(namespace.resolve("a/b/c/d/e")[0].name, "a/b/c/d")
        self.assertEqual(namespace.resolve("a/bc")[0].name, "a")
        self.assertEqual(namespace.resolve("a/bc")[1], "/bc")

    def test_caseInsensitiveName(self) -> None:
        namespace = _namespace("HyCo")
        entity, suffix = namespace.resolve("hYcO/Room")
        self.assertEqual((entity.name, suffix), ("HyCo", "/Room"))

    def test_onlyOnSegmentBoundaries(self) -> None:
        namespace = _namespace("hyco")
        self.assertRaises(EndpointNotFound, namespace.resolve, "hyco2")
        self.assertRaises(EndpointNotFound, namespace.resolve, "hyco2/x")
        self.assertRaises(EndpointNotFound, namespace.resolve, "hy")

    def test_unknown(self) -> None:
        namespace = _namespace("a/b")
        for path in ["", "/", "a", "b", "x/a/b"]:
            with self.subTest(path=path):
                error = self.assertRaises(EndpointNotFound, namespace.resolve, path)
                self.assertEqual(error.status, 404)
                self.assertIn("Endpoint does not exist", error.reason)


class ForListenerTests(SynchronousTestCase):
    """
    A listener registers with an exact name.
    """

    def test_exactNameAnyCase(self) -> None:
        namespace = _namespace("hyco")
        self.assertIs(namespace.forListener("HYCO"), namespace.get("hyco"))
        self.assertIs(namespace.forListener("/hyco/"), namespace.get("hyco"))

    def test_noPrefixMatching(self) -> None:
        namespace = _namespace("hyco")
        self.assertRaises(EndpointNotFound, namespace.forListener, "hyco/room")

    def test_noDynamicEntitiesByDefault(self) -> None:
        namespace = _namespace()
        self.assertRaises(EndpointNotFound, namespace.forListener, "fresh")
        self.assertEqual(list(namespace.entities()), [])

    def test_dynamicEntityMade(self) -> None:
        namespace = _namespace(dynamicEntities=True, maxListeners=3)
        entity = namespace.forListener("/Fresh/One/")
        self.assertEqual((entity.name, entity.dynamic, entity.maxListeners), ("Fresh/One", True, 3))
        self.assertFalse(entity.anonymousSenders)
        self.assertIs(namespace.get("fresh/one"), entity)
        self.assertIs(namespace.forListener("fresh/one"), entity)

    def test_anonymousNamesApplyToDynamicEntities(self) -> None:
        namespace = _namespace(dynamicEntities=True, anonymousNames=frozenset({"open/door"}))
        self.assertTrue(namespace.forListener("Open/Door").anonymousSenders)
        self.assertFalse(namespace.forListener("closed").anonymousSenders)

    def test_declaredEntityIsNotDynamic(self) -> None:
        namespace = _namespace("hyco", dynamicEntities=True)
        self.assertFalse(namespace.forListener("hyco").dynamic)

    def test_invalidDynamicNameIsBadRequest(self) -> None:
        namespace = _namespace(dynamicEntities=True)
        for path in ["a//b", "$hc", "a b"]:
            with self.subTest(path=path):
                error = self.assertRaises(BadRequest, namespace.forListener, path)
                self.assertEqual(error.status, 400)
        self.assertEqual(list(namespace.entities()), [])


class ListenersGoneTests(SynchronousTestCase):
    def test_dynamicEntityRemoved(self) -> None:
        namespace = _namespace(dynamicEntities=True)
        entity = namespace.forListener("fresh")
        namespace.listenersGone(entity)
        self.assertIsNone(namespace.get("fresh"))
        self.assertRaises(EndpointNotFound, namespace.resolve, "fresh")

    def test_declaredEntityKept(self) -> None:
        namespace = _namespace("hyco", dynamicEntities=True)
        entity = namespace.forListener("hyco")
        namespace.listenersGone(entity)
        self.assertIs(namespace.get("hyco"), entity)

    def test_staleEntityDoesNotRemoveItsSuccessor(self) -> None:
        namespace = _namespace(dynamicEntities=True)
        old = namespace.forListener("fresh")
        namespace.listenersGone(old)
        new = namespace.forListener("fresh")
        namespace.listenersGone(old)
        self.assertIs(namespace.get("fresh"), new)
