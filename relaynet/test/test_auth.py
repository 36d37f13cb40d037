# -*- test-case-name: relaynet.test.test_auth -*-
"""
Tests for L{relaynet.auth}.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Callable
from urllib.parse import parse_qs, quote, quote_plus, unquote

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from relaynet.auth import (
    ALL_RIGHTS,
    Authorizer,
    Rights,
    Rule,
    SasToken,
    generateKey,
    mintToken,
    normaliseScope,
)
from relaynet.errors import Forbidden, RelayError, Unauthorized

KEY = "c2VjcmV0LWtleS1ub3QtcmVhbA=="
OTHER_KEY = "b3RoZXIta2V5LW5vdC1yZWFsLWVpdGhlcg=="
SE = 1700000000
NOW = SE - 60.0
HOST = "contoso.servicebus.windows.net"
ROOT = "RootManageSharedAccessKey"

# Section 2.2 of the protocol notes, computed with the Node algorithm.
HYCO_WS = (
    "SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%3A443%2Fhyco"
    "&sig=V4NhZnJGs8QcCSwNPKk%2BtJ79kznB2ufBSEwyln1fFgc%3D&se=1700000000&skn=RootManageSharedAccessKey"
)
HYCO_HTTPS = (
    "SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco"
    "&sig=m7ufBEfYIQ80TTwoEfG7MceBH%2BON6z7frcBrFRzCi50%3D&se=1700000000&skn=RootManageSharedAccessKey"
)
DOTNET = (
    "SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F"
    "&sig=MFhrVIs182bf0zMMEF9Gm8df8onKBAweIF29TC0HhQw%3D&se=1700000000&skn=RootManageSharedAccessKey"
)
JAVA = (
    "SharedAccessSignature sr=sb%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco"
    "&sig=dyu4YbRw7mESaT2i9Jxx74nEPlJWdy6imdAVyBDFSwg%3D&se=1700000000&skn=RootManageSharedAccessKey"
)


def referenceSignature(resource: str, expiry: str, key: str) -> str:
    """
    Section 2.2 written out independently of the code under test: the base64
    HMAC-SHA256 of the raw C{sr} text, LF, the C{se} text.
    """
    digest = hmac.new(key.encode("utf-8"), f"{resource}\n{expiry}".encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def referenceToken(resource: str, key: str = KEY, expiry: int = SE, keyName: str = ROOT, safe: str = "") -> str:
    """
    A token for a raw, already encoded C{sr}, its signature quoted with
    C{safe} kept unescaped.
    """
    signature = quote(referenceSignature(resource, str(expiry), key), safe=safe)
    return f"SharedAccessSignature sr={resource}&sig={signature}&se={expiry}&skn={keyName}"


def signatureOf(token: str) -> str:
    """
    The C{sig} field of C{token}, as it appears in the text.
    """
    return token.split("&sig=", 1)[1].split("&", 1)[0]


def withSignature(token: str, signature: str) -> str:
    return token.replace(f"&sig={signatureOf(token)}&", f"&sig={signature}&")


class RightsTests(SynchronousTestCase):
    def test_parseCommas(self) -> None:
        self.assertEqual(Rights.parse("Listen,Send"), Rights.LISTEN | Rights.SEND)

    def test_parseSpacesAnyCase(self) -> None:
        self.assertEqual(Rights.parse(" listen SEND  Manage "), ALL_RIGHTS)

    def test_parseMixedSeparators(self) -> None:
        self.assertEqual(Rights.parse("send, listen"), Rights.LISTEN | Rights.SEND)

    def test_parseUnknown(self) -> None:
        e = self.assertRaises(ValueError, Rights.parse, "Listen,Read")
        self.assertIn("'Read'", str(e))

    def test_parseEmpty(self) -> None:
        self.assertRaises(ValueError, Rights.parse, " , ")

    def test_manageImpliesListenAndSend(self) -> None:
        rule = Rule("admin", KEY, rights=Rights.MANAGE)
        self.assertTrue(rule.grants(Rights.LISTEN))
        self.assertTrue(rule.grants(Rights.SEND))
        self.assertTrue(rule.grants(Rights.LISTEN | Rights.SEND))

    def test_grantsOnlyWhatItHas(self) -> None:
        rule = Rule("sender", KEY, rights=Rights.SEND)
        self.assertTrue(rule.grants(Rights.SEND))
        self.assertFalse(rule.grants(Rights.LISTEN))
        self.assertFalse(rule.grants(Rights.MANAGE))
        self.assertFalse(rule.grants(Rights.LISTEN | Rights.SEND))

    def test_defaultRights(self) -> None:
        rule = Rule("root", KEY)
        self.assertEqual(rule.rights, ALL_RIGHTS)
        self.assertIsNone(rule.secondaryKey)


class GenerateKeyTests(SynchronousTestCase):
    def test_shape(self) -> None:
        key = generateKey()
        self.assertEqual(len(key), 44)
        self.assertEqual(len(base64.b64decode(key, validate=True)), 32)

    def test_random(self) -> None:
        self.assertNotEqual(generateKey(), generateKey())


class MintTokenTests(SynchronousTestCase):
    """
    L{mintToken} reproduces the worked examples of section 2.2 byte for byte.
    """

    def test_hycoWs(self) -> None:
        self.assertEqual(mintToken(f"http://{HOST}:443/hyco", ROOT, KEY, SE), HYCO_WS)

    def test_hycoHttps(self) -> None:
        self.assertEqual(mintToken(f"http://{HOST}/hyco", ROOT, KEY, SE), HYCO_HTTPS)

    def test_dotNet(self) -> None:
        self.assertEqual(mintToken(f"http://{HOST}/hyco/", ROOT, KEY, SE), DOTNET)

    def test_java(self) -> None:
        self.assertEqual(mintToken(f"sb://{HOST}/hyco", ROOT, KEY, SE), JAVA)


class SasTokenTests(SynchronousTestCase):
    def test_fields(self) -> None:
        token = SasToken.parse(HYCO_WS)
        self.assertEqual(
            token,
            SasToken(
                resource="http%3A%2F%2Fcontoso.servicebus.windows.net%3A443%2Fhyco",
                signature="V4NhZnJGs8QcCSwNPKk+tJ79kznB2ufBSEwyln1fFgc=",
                expiry=SE,
                keyName=ROOT,
            ),
        )
        self.assertEqual(token.resourceUri, "http://contoso.servicebus.windows.net:443/hyco")

    def test_anyCaseAnyOrder(self) -> None:
        text = "sharedaccesssignature  SKN=r&Se=5&SIG=abc%2B&sR=http%3A%2F%2Fh%2Fp"
        self.assertEqual(SasToken.parse(text), SasToken("http%3A%2F%2Fh%2Fp", "abc+", 5, "r"))

    def test_signatureIsNotFormDecoded(self) -> None:
        self.assertEqual(SasToken.parse(withSignature(HYCO_WS, "a+b%2Fc")).signature, "a+b/c")

    def test_valueMaySplitOnFirstEquals(self) -> None:
        self.assertEqual(SasToken.parse(withSignature(HYCO_WS, "abc==")).signature, "abc==")

    def assertMalformed(self, text: str, detail: str) -> None:
        e = self.assertRaises(Unauthorized, SasToken.parse, text)
        self.assertEqual(e.status, 401)
        self.assertTrue(e.reason.startswith("Malformed token: "), e.reason)
        self.assertIn(detail, e.reason)

    def test_noSchemeWord(self) -> None:
        self.assertMalformed(HYCO_WS.split(" ", 1)[1], "SharedAccessSignature sr=")

    def test_otherScheme(self) -> None:
        self.assertMalformed("Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "SharedAccessSignature sr=")

    def test_schemeWordOnly(self) -> None:
        self.assertMalformed("SharedAccessSignature ", "SharedAccessSignature sr=")

    def test_missingFields(self) -> None:
        self.assertMalformed("SharedAccessSignature sr=http%3A%2F%2Fh%2Fp&skn=r", "missing sig, se")

    def test_emptyField(self) -> None:
        self.assertMalformed(HYCO_WS.replace(f"skn={ROOT}", "skn="), "missing skn")

    def test_nonIntegerExpiry(self) -> None:
        for se in ["soon", "1.5e9", "-5", "+5", " 5", "0x10", "1_000", "007"]:
            self.assertMalformed(HYCO_WS.replace(f"se={SE}", f"se={se}"), "se must be")

    def test_notPairs(self) -> None:
        self.assertMalformed(HYCO_WS + "&garbage", "name=value")

    def test_duplicateField(self) -> None:
        self.assertMalformed(HYCO_WS + "&SE=1", "'SE' appears twice")

    def test_garbage(self) -> None:
        for text in ["garbage", "SharedAccessSignature", "\x00\xff", "SharedAccessSignature &&&"]:
            self.assertRaises(Unauthorized, SasToken.parse, text)

    def test_resourceNotARelayAddress(self) -> None:
        self.assertMalformed(mintToken("ftp://contoso/hyco", ROOT, KEY, SE), "ftp://contoso/hyco")


class NormaliseScopeTests(SynchronousTestCase):
    def test_clientForms(self) -> None:
        for uri in [
            f"http://{HOST}:443/hyco",
            f"https://{HOST}/hyco",
            f"http://{HOST}/hyco/",
            f"sb://{HOST}/hyco",
            f"wss://{HOST}:443/$hc/hyco?sb-hc-action=listen",
            f"ws://{HOST}:9080/$hc/hyco/",
            f"{HOST}/hyco",
        ]:
            self.assertEqual(normaliseScope(uri), (HOST, "hyco"), uri)

    def test_case(self) -> None:
        self.assertEqual(normaliseScope("HTTP://Contoso.Example.COM/$HC/A/Hyco/"), ("contoso.example.com", "a/hyco"))

    def test_root(self) -> None:
        for uri in [f"http://{HOST}/", f"http://{HOST}", f"sb://{HOST}:5671/$hc/", f"http://{HOST}/?x=1"]:
            self.assertEqual(normaliseScope(uri), (HOST, ""), uri)

    def test_ipv6(self) -> None:
        self.assertEqual(normaliseScope("http://[::1]:443/hyco"), ("[::1]", "hyco"))
        self.assertEqual(normaliseScope("http://[::1]/hyco"), ("[::1]", "hyco"))

    def test_otherScheme(self) -> None:
        self.assertRaises(ValueError, normaliseScope, f"ftp://{HOST}/hyco")

    def test_schemeWithoutHost(self) -> None:
        self.assertRaises(ValueError, normaliseScope, "http:///hyco")


class AuthorizeTests(SynchronousTestCase):
    """
    Tokens every client produces are accepted for their scope.
    """

    def setUp(self) -> None:
        self.authorizer = Authorizer([Rule(ROOT, KEY)])

    def authorize(
        self,
        token: str | None,
        entity: str = "hyco",
        needed: Rights = Rights.LISTEN,
        host: str = HOST,
        now: float = NOW,
        entityRules: tuple[Rule, ...] = (),
        grace: bool = False,
    ) -> SasToken:
        return self.authorizer.authorize(token, host, entity, needed, now, entityRules, grace=grace)

    def test_hycoWs(self) -> None:
        token = self.authorize(HYCO_WS, host=f"{HOST}:443")
        self.assertEqual(token, SasToken.parse(HYCO_WS))

    def test_hycoHttps(self) -> None:
        self.assertEqual(self.authorize(HYCO_HTTPS, needed=Rights.SEND).expiry, SE)

    def test_dotNetTrailingSlash(self) -> None:
        self.assertEqual(self.authorize(DOTNET).resourceUri, f"http://{HOST}/hyco/")

    def test_javaSb(self) -> None:
        self.assertEqual(self.authorize(JAVA).resourceUri, f"sb://{HOST}/hyco")

    def test_pythonHelperSignatureWithSlash(self) -> None:
        """
        The Python doc helper quotes C{sig} keeping C{/}, so the token text
        may hold a raw C{/} in C{sig}.
        """
        resource = quote(f"http://{HOST}/hyco", safe="")
        expiry = next(se for se in range(SE, SE + 1000) if "/" in referenceSignature(resource, str(se), KEY))
        text = referenceToken(resource, expiry=expiry, safe="/")
        self.assertIn("/", signatureOf(text))
        self.assertEqual(self.authorize(text).expiry, expiry)

    def test_namespaceRoot(self) -> None:
        text = mintToken(f"http://{HOST}/", ROOT, KEY, SE)
        for entity in ["hyco", "hyco2", "a/b/c"]:
            self.assertEqual(self.authorize(text, entity=entity).resourceUri, f"http://{HOST}/")

    def test_dotNetQueryForm(self) -> None:
        """
        A token put in C{sb-hc-token} with form encoding (space as C{+},
        C{%} as C{%25}) is the header form after the caller's single form
        decoding; its raw C{sr}, lower-case escapes included, is what is
        hashed.
        """
        text = referenceToken("http%3a%2f%2fcontoso.servicebus.windows.net%2fhyco%2f")
        query = "sb-hc-action=listen&sb-hc-token=" + quote_plus(text)
        self.assertIn("SharedAccessSignature+sr%3Dhttp%253a", query)
        decoded = parse_qs(query)["sb-hc-token"][0]
        self.assertEqual(decoded, text)
        self.assertEqual(self.authorize(decoded).resource, "http%3a%2f%2fcontoso.servicebus.windows.net%2fhyco%2f")

    def test_reEncodedResourceFails(self) -> None:
        """
        The raw C{sr} is hashed: the same URI with other escapes is not the
        signed text.
        """
        text = DOTNET.replace("sr=http%3A%2F%2F", "sr=http%3a%2f%2f")
        e = self.assertRaises(Unauthorized, self.authorize, text)
        self.assertEqual(e.reason, "The token has an invalid signature.")

    def test_signaturePlusFormDecodedToSpace(self) -> None:
        signature = unquote(signatureOf(HYCO_WS))
        self.assertIn("+", signature)
        for spaced in [signature.replace("+", " "), signature.replace("+", "%20")]:
            self.assertEqual(self.authorize(withSignature(HYCO_WS, spaced)).keyName, ROOT)

    def test_unquotedSignature(self) -> None:
        self.assertEqual(self.authorize(withSignature(HYCO_WS, unquote(signatureOf(HYCO_WS)))).expiry, SE)

    def test_scopeCaseIgnored(self) -> None:
        upper = mintToken("HTTP://CONTOSO.SERVICEBUS.WINDOWS.NET/HyCo", ROOT, KEY, SE)
        self.assertEqual(self.authorize(upper).keyName, ROOT)
        self.assertEqual(self.authorize(HYCO_HTTPS, entity="HYCO", host=HOST.upper()).keyName, ROOT)

    def test_entityPathNormalised(self) -> None:
        self.assertEqual(self.authorize(HYCO_HTTPS, entity="/$hc/hyco/").keyName, ROOT)

    def test_belowScope(self) -> None:
        text = mintToken(f"http://{HOST}/team", ROOT, KEY, SE)
        self.assertEqual(self.authorize(text, entity="team/orders").keyName, ROOT)

    def test_noHostCheck(self) -> None:
        self.assertEqual(self.authorize(HYCO_HTTPS, host="").keyName, ROOT)

    def test_keyNameAnyCase(self) -> None:
        text = mintToken(f"http://{HOST}/hyco", ROOT.upper(), KEY, SE)
        self.assertEqual(self.authorize(text).keyName, ROOT.upper())

    def test_secondaryKey(self) -> None:
        self.authorizer = Authorizer([Rule(ROOT, OTHER_KEY, secondaryKey=KEY)])
        self.assertEqual(self.authorize(HYCO_HTTPS).keyName, ROOT)

    def test_entityRuleFirst(self) -> None:
        """
        An entity rule shadows a namespace rule of the same name.
        """
        entityRules = (Rule(ROOT.lower(), OTHER_KEY),)
        own = mintToken(f"http://{HOST}/hyco", ROOT, OTHER_KEY, SE)
        self.assertEqual(self.authorize(own, entityRules=entityRules).keyName, ROOT)
        e = self.assertRaises(Unauthorized, self.authorize, HYCO_HTTPS, entityRules=entityRules)
        self.assertEqual(e.status, 401)

    def test_namespaceRuleAfterEntityRules(self) -> None:
        entityRules = (Rule("hycoSend", OTHER_KEY, rights=Rights.SEND),)
        self.assertEqual(self.authorize(HYCO_HTTPS, entityRules=entityRules).keyName, ROOT)

    def test_expiresNow(self) -> None:
        self.assertEqual(self.authorize(HYCO_HTTPS, now=SE).expiry, SE)

    def test_graceForRenewal(self) -> None:
        self.assertEqual(self.authorize(HYCO_HTTPS, now=SE + 300, grace=True).expiry, SE)


class RefusalTests(SynchronousTestCase):
    """
    Each refusal has the right status and an informative reason that gives
    away neither key nor signature.
    """

    def setUp(self) -> None:
        self.authorizer = Authorizer(
            [Rule(ROOT, KEY), Rule("sender", OTHER_KEY, rights=Rights.SEND)],
            graceSeconds=120,
        )

    def assertRefused(
        self, kind: type[RelayError], status: int, token: str | None, *, detail: str, **kwargs: object
    ) -> RelayError:
        call: Callable[..., SasToken] = self.authorizer.authorize
        arguments = {"host": HOST, "entityPath": "hyco", "needed": Rights.LISTEN, "now": NOW, **kwargs}
        e = self.assertRaises(kind, call, token, **arguments)
        self.assertEqual(e.status, status)
        self.assertIn(detail, e.reason)
        for secret in [KEY, OTHER_KEY, "V4NhZnJGs8QcCSwNPKk", "m7ufBEfYIQ80TTwoEfG7MceBH"]:
            self.assertNotIn(secret, e.reason)
        return e

    def test_missing(self) -> None:
        for token in [None, ""]:
            e = self.assertRefused(Unauthorized, 401, token, detail="token is missing")
            self.assertIn("ServiceBusAuthorization", e.reason)
            self.assertIn("sb-hc-token", e.reason)

    def test_malformed(self) -> None:
        for text in [
            HYCO_HTTPS.split(" ", 1)[1],
            "SharedAccessSignature sr=http%3A%2F%2Fh%2Fhyco&se=1",
            HYCO_HTTPS.replace(f"se={SE}", "se=tomorrow"),
            "}{ garbage",
        ]:
            self.assertRefused(Unauthorized, 401, text, detail="Malformed token: ")

    def test_expired(self) -> None:
        e = self.assertRefused(Unauthorized, 401, HYCO_HTTPS, detail="The token is expired.", now=SE + 1)
        self.assertIn("Expiration time: '2023-11-14T22:13:20Z'", e.reason)

    def test_expiredPastGrace(self) -> None:
        self.assertRefused(Unauthorized, 401, HYCO_HTTPS, detail="expired", now=SE + 121, grace=True)

    def test_withinGrace(self) -> None:
        self.assertRefused(Unauthorized, 401, HYCO_HTTPS, detail="expired", now=SE + 120)
        token = self.authorizer.authorize(HYCO_HTTPS, HOST, "hyco", Rights.LISTEN, SE + 120, grace=True)
        self.assertEqual(token.expiry, SE)

    def test_wrongKey(self) -> None:
        text = mintToken(f"http://{HOST}/hyco", ROOT, OTHER_KEY, SE)
        e = self.assertRefused(Unauthorized, 401, text, detail="invalid signature")
        self.assertEqual(e.reason, "The token has an invalid signature.")

    def test_tamperedResource(self) -> None:
        text = HYCO_HTTPS.replace("%2Fhyco&", "%2Fother&")
        self.assertRefused(Unauthorized, 401, text, detail="invalid signature", entityPath="other")

    def test_tamperedExpiry(self) -> None:
        text = HYCO_HTTPS.replace(f"se={SE}", f"se={SE + 3600}")
        self.assertRefused(Unauthorized, 401, text, detail="invalid signature", now=SE + 60)

    def test_unknownRule(self) -> None:
        text = mintToken(f"http://{HOST}/hyco", "nobody", KEY, SE)
        e = self.assertRefused(Unauthorized, 401, text, detail="rule is unknown")
        self.assertIn("'nobody'", e.reason)

    def test_sendRuleCannotListen(self) -> None:
        text = mintToken(f"http://{HOST}/hyco", "sender", OTHER_KEY, SE)
        e = self.assertRefused(Forbidden, 403, text, detail="Authorization failed for specified action: Listen.")
        self.assertIn("'sender' grants Send", e.reason)
        self.assertEqual(self.authorizer.authorize(text, HOST, "hyco", Rights.SEND, NOW).keyName, "sender")

    def test_wrongEntity(self) -> None:
        e = self.assertRefused(Forbidden, 403, HYCO_HTTPS, detail="not valid for this path", entityPath="other")
        self.assertIn("Token is not valid for this path for this action: Listen", e.reason)

    def test_siblingSharingPrefix(self) -> None:
        self.assertRefused(Forbidden, 403, HYCO_HTTPS, detail="not valid for this path", entityPath="hyco2")

    def test_aboveScope(self) -> None:
        text = mintToken(f"http://{HOST}/hyco/sub", ROOT, KEY, SE)
        self.assertRefused(Forbidden, 403, text, detail="not valid for this path")

    def test_wrongHost(self) -> None:
        e = self.assertRefused(Forbidden, 403, HYCO_WS, detail="not valid for this host", host="fabrikam.example:443")
        self.assertIn(f"'{HOST}'", e.reason)

    def test_signatureBeforeScope(self) -> None:
        """
        A forged token for the wrong scope is an invalid signature, not a
        scope refusal.
        """
        text = mintToken(f"http://{HOST}/other", ROOT, OTHER_KEY, SE)
        self.assertRefused(Unauthorized, 401, text, detail="invalid signature")


_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_segments = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/?#"), min_size=1, max_size=12)


class PropertyTests(SynchronousTestCase):
    @given(
        path=st.lists(_segments, min_size=1, max_size=4).map("/".join),
        key=st.text(min_size=1, max_size=64),
        expiry=st.integers(min_value=0, max_value=2**40),
        age=st.integers(min_value=0, max_value=10**6),
        index=st.integers(min_value=0),
        replacement=st.sampled_from(_BASE64),
    )
    def test_mintedTokensVerify(self, path: str, key: str, expiry: int, age: int, index: int, replacement: str) -> None:
        """
        Any minted token verifies for its entity; changing any one character
        of its signature makes it fail.
        """
        authorizer = Authorizer([Rule("rule", key)])
        text = mintToken(f"https://{HOST}/{path}", "rule", key, expiry)
        now = float(max(expiry - age, 0))
        self.assertEqual(authorizer.authorize(text, HOST, path, Rights.SEND, now).expiry, expiry)

        signature = unquote(signatureOf(text))
        index %= len(signature)
        if signature[index] == replacement:
            replacement = "A" if replacement != "A" else "B"
        flipped = signature[:index] + replacement + signature[index + 1 :]
        e = self.assertRaises(
            Unauthorized, authorizer.authorize, withSignature(text, quote(flipped, safe="")), HOST, path, Rights.SEND, now
        )
        self.assertEqual(e.status, 401)
        self.assertEqual(e.reason, "The token has an invalid signature.")


class HostnameTests(SynchronousTestCase):
    """
    Names given to the L{Authorizer} are accepted whatever the Host header.
    """

    def test_aliasAccepted(self) -> None:
        rule = Rule("root", "a2V5LWZvci1ob3N0bmFtZS10ZXN0cw==")
        token = mintToken("http://relay.example.com/hyco", "root", rule.primaryKey, 2000)
        authorizer = Authorizer([rule], hostnames=["Relay.Example.com:443"])
        checked = authorizer.authorize(token, "10.0.0.5:9090", "hyco", Rights.SEND, 1000)
        self.assertEqual(checked.keyName, "root")

    def test_otherHostRefused(self) -> None:
        rule = Rule("root", "a2V5LWZvci1ob3N0bmFtZS10ZXN0cw==")
        token = mintToken("http://elsewhere.example.com/hyco", "root", rule.primaryKey, 2000)
        authorizer = Authorizer([rule], hostnames=["relay.example.com"])
        e = self.assertRaises(Forbidden, authorizer.authorize, token, "10.0.0.5:9090", "hyco", Rights.SEND, 1000)
        self.assertEqual(e.status, 403)


class PassedTokenTests(SynchronousTestCase):
    """
    A token that passed is passed again without its signature being
    checked again, but its expiry is checked every time.
    """

    def setUp(self) -> None:
        self.authorizer = Authorizer([Rule(ROOT, KEY)])
        self.verified: list[str] = []
        original = self.authorizer._verify

        def verify(token: SasToken, rules: tuple[Rule, ...]) -> Rule:
            self.verified.append(token.signature)
            return original(token, rules)

        self.patch(self.authorizer, "_verify", verify)

    def test_passedAgainCheaply(self) -> None:
        for _ in range(3):
            self.authorizer.authorize(HYCO_HTTPS, HOST, "hyco", Rights.SEND, NOW)
        self.assertEqual(len(self.verified), 1)

    def test_expiryCheckedEveryTime(self) -> None:
        self.authorizer.authorize(HYCO_HTTPS, HOST, "hyco", Rights.SEND, NOW)
        self.assertRaises(Unauthorized, self.authorizer.authorize, HYCO_HTTPS, HOST, "hyco", Rights.SEND, SE + 1.0)

    def test_otherUseCheckedAgain(self) -> None:
        """
        Passing for one entity, host or right says nothing of another; a
        token that failed is not remembered.
        """
        self.authorizer.authorize(HYCO_HTTPS, HOST, "hyco", Rights.SEND, NOW)
        self.assertRaises(Forbidden, self.authorizer.authorize, HYCO_HTTPS, HOST, "other", Rights.SEND, NOW)
        self.assertRaises(Forbidden, self.authorizer.authorize, HYCO_HTTPS, "evil.example", "hyco", Rights.SEND, NOW)
        bad = withSignature(HYCO_HTTPS, "AAAA")
        for _ in range(2):
            self.assertRaises(Unauthorized, self.authorizer.authorize, bad, HOST, "hyco", Rights.SEND, NOW)
        self.assertEqual(len(self.verified), 5)

    def test_entityRulesOfTheCall(self) -> None:
        """
        A pass under one entity's own rules does not carry over to another
        set of rules.
        """
        own = (Rule("EntityRule", OTHER_KEY),)
        self.authorizer.authorize(HYCO_HTTPS, HOST, "hyco", Rights.SEND, NOW, own)
        self.authorizer.authorize(HYCO_HTTPS, HOST, "hyco", Rights.SEND, NOW, ())
        self.assertEqual(len(self.verified), 2)

    def test_bounded(self) -> None:
        from relaynet import auth

        self.patch(auth, "PASSED_CACHE", 3)
        for expiry in range(SE, SE + 10):
            token = mintToken(f"http://{HOST}/hyco", ROOT, KEY, expiry)
            self.authorizer.authorize(token, HOST, "hyco", Rights.SEND, NOW)
        self.assertEqual(len(self.authorizer._passed), 3)
