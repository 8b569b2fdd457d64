"""The crawler list: a vendored snapshot of crawler-user-agents, compiled down to literal
tokens (no regex of upstream's runs on a request), matched in linear time, memoised.

Upstream's regexes are the oracle: every string one of them matches is a bot here too;
real browsers' user agents (desktop, mobile, in-app, TV) are not."""

from __future__ import annotations

import importlib.resources
import json
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from personalize_middleware.tracking import is_bot
from personalize_middleware.tracking._bots import (
    BOT_LIST_FILE,
    MAX_USER_AGENT,
    Alternative,
    BotPatternError,
    _classify,
    _matcher,
    literal_alternatives,
    load_patterns,
)
from personalize_middleware.tracking._update_bot_list import main as update_bot_list
from personalize_middleware.tracking._update_bot_list import render_list
from tests.support.tracking_helpers import BROWSER_USER_AGENT, GOOGLEBOT_USER_AGENT

LIST_TEXT = (
    importlib.resources.files("personalize_middleware.tracking")
    .joinpath(BOT_LIST_FILE)
    .read_text(encoding="utf-8")
)
PATTERNS = load_patterns(LIST_TEXT)
UPSTREAM = [re.compile(pattern, re.IGNORECASE) for pattern in PATTERNS]

KNOWN_CRAWLERS = [
    GOOGLEBOT_USER_AGENT,
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, "
    "like Gecko) Chrome/131.0.6778.204 Mobile Safari/537.36 (compatible; Googlebot/2.1; "
    "+http://www.google.com/bot.html)",
    "AdsBot-Google (+http://www.google.com/adsbot.html)",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; "
    "+http://www.bing.com/bingbot.htm) Chrome/116.0.1938.76 Safari/537.36",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; "
    "+https://openai.com/gptbot)",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; ClaudeBot/1.0; "
    "+claudebot@anthropic.com)",
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "Twitterbot/1.0",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "Mozilla/5.0 (compatible; SemrushBot/7~bl; +http://www.semrush.com/bot.html)",
    "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
    "Mozilla/5.0 (compatible; Baiduspider/2.0; +http://www.baidu.com/search/spider.html)",
    "DuckDuckBot/1.1; (+http://duckduckgo.com/duckduckbot.html)",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_5) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/13.1.1 Safari/605.1.15 (Applebot/0.1; +http://www.apple.com/go/applebot)",
    "Mozilla/5.0 (Linux; Android 5.0) AppleWebKit/537.36 (KHTML, like Gecko) Mobile "
    "Safari/537.36 (compatible; Bytespider; spider-feedback@bytedance.com)",
    "Mozilla/5.0 (compatible;PetalBot;+https://webmaster.petalsearch.com/site/petalbot)",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 11; moto g power (2022)) AppleWebKit/537.36 (KHTML, like "
    "Gecko) Chrome/131.0.0.0 Mobile Safari/537.36 Chrome-Lighthouse",
    "curl/8.5.0",
    "Wget/1.21.4",
    "python-requests/2.32.3",
    "python-httpx/0.28.1",
    "Go-http-client/2.0",
    "Silk/1.0",  # ^Silk/ is a crawler; Amazon's browser has Silk/ in the middle (below)
]

# Real browsers, as people's devices send them: none may be taken for a crawler.
PEOPLE = [
    BROWSER_USER_AGENT,
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/156.0.0.0 Safari/537.36",
    "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36 OPR/115.0.0.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Safari/537.36 Vivaldi/7.0.3495.18",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/128.0.0.0 YaBrowser/24.10.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPad; CPU OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.7 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) FxiOS/133.0 Mobile/15E148 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) EdgiOS/131.0.2903.68 Version/18.0 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) GSA/343.0.695551749 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) Version/18.1 Mobile/15E148 DuckDuckGo/7 Safari/605.1.15",
    "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S918B) AppleWebKit/537.36 (KHTML, like "
    "Gecko) SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0",
    "Mozilla/5.0 (Linux; Android 9; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Silk/131.3.1 like Chrome/131.0.6778.135 Safari/537.36",
    "Mozilla/5.0 (Linux; U; Android 10; en-US; RMX2020 Build/QP1A.190711.020) "
    "AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/78.0.3904.108 "
    "UCBrowser/13.4.0.1306 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 12; NOH-NX9) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/114.0.0.0 HuaweiBrowser/15.0.4.312 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; U; Android 13; en-us; 2201117TG Build/TKQ1.221114.001) "
    "AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/112.0.5615.136 Mobile "
    "Safari/537.36 XiaoMi/MiuiBrowser/14.12.0-gn",
    "Mozilla/5.0 (Linux; Android 13; Pixel 7 Build/TQ3A.230805.001; wv) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Version/4.0 Chrome/131.0.6778.81 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Mobile Safari/537.36 EdgA/131.0.0.0",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8 Build/AP2A.240805.005; wv) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Version/4.0 Chrome/131.0.6778.39 Mobile Safari/537.36 "
    "GSA/15.46.35.29.arm64",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) Mobile/15E148 [FBAN/FBIOS;FBAV/470.0.0.36.107;FBBV/640064556;"
    "FBDV/iPhone14,5;FBMD/iPhone;FBSN/iOS;FBSV/17.5;FBSS/3;FBID/phone;FBLC/en_US;FBOP/5]",
    "Mozilla/5.0 (Linux; Android 14; SM-A546B Build/UP1A.231005.007; wv) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Version/4.0 Chrome/131.0.6778.39 Mobile Safari/537.36 "
    "[FB_IAB/FB4A;FBAV/489.0.0.66.81;]",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) Mobile/15E148 Instagram 350.0.0.30.91 (iPhone14,5; iOS 17_5; en_US; en; "
    "scale=3.00; 1170x2532; 640064556)",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) Mobile/15E148 Safari Line/14.19.0",
    "Mozilla/5.0 (Linux; Android 13; V2111 Build/TP1A.220624.014; wv) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Version/4.0 Chrome/116.0.0.0 Mobile Safari/537.36 XWEB/1160065 "
    "MMWEBSDK/20231202 MMWEBID/2247 MicroMessenger/8.0.47.2560(0x28002F35) WeChat/arm64 "
    "Weixin NetType/WIFI Language/zh_CN ABI/arm64",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) Mobile/15E148 KAKAOTALK 10.4.5",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) Mobile/15E148 Snapchat/13.0.0.42 (like Safari/8617.2.4.10.8, panda)",
    "Mozilla/5.0 (Linux; Android 13; SM-G991B Build/TP1A.220624.014; wv) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Version/4.0 Chrome/131.0.6778.39 Mobile Safari/537.36 trill_370104 "
    "JsSdk/1.0 NetType/WIFI Channel/googleplay AppName/trill app_version/37.1.4 "
    "ByteLocale/en ByteFullLocale/en Region/US BytedanceWebview/d8a21c6",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    "like Gecko) Mobile/15E148 NAVER(inapp; search; 2000; 12.7.2; 14PRO)",
    "Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) "
    "SamsungBrowser/4.0 Chrome/76.0.3809.146 TV Safari/537.36",
    "Mozilla/5.0 (Web0S; Linux/SmartTV) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/87.0.4280.88 Safari/537.36 WebAppManager",
    "Mozilla/5.0 (PlayStation; PlayStation 5/2.26) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    "Opera/9.80 (Android; Opera Mini/36.2.2254/119.132; U; id) Presto/2.12.423 Version/12.16",
    "Mozilla/5.0 (Windows NT 10.0; WOW64; Trident/7.0; rv:11.0) like Gecko",
    "Mozilla/5.0 (Linux; Android 14; moto g power 5G - 2024) AppleWebKit/537.36 (KHTML, like "
    "Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
    "testclient",  # Starlette's TestClient: not on the list
]


def test_the_vendored_list_says_where_it_comes_from() -> None:
    header = LIST_TEXT[: LIST_TEXT.index("\n\n") if "\n\n" in LIST_TEXT else 3000]
    assert "https://github.com/monperrus/crawler-user-agents" in header
    assert "crawler-user-agents 1.67.0" in header
    assert re.search(r"Taken: \d{4}-\d{2}-\d{2}", header)
    assert "MIT" in header and "Copyright (c) 2017 Martin Monperrus" in header
    assert len(PATTERNS) > 1000
    assert " DVbot" in PATTERNS and "webmon " in PATTERNS  # significant spaces kept


def test_every_entry_compiles_to_literals() -> None:
    for pattern in PATTERNS:
        re.compile(pattern)  # upstream's regex is valid...
        alternatives = literal_alternatives(pattern)  # ...and has a literal form
        assert alternatives and all(a.tokens and all(a.tokens) for a in alternatives)


@pytest.mark.parametrize("user_agent", KNOWN_CRAWLERS)
def test_known_crawlers_are_bots(user_agent: str) -> None:
    assert is_bot(user_agent)
    assert is_bot(user_agent.upper())  # case-insensitive
    assert is_bot(user_agent.encode("latin-1"))  # a raw header value works too


@pytest.mark.parametrize("user_agent", PEOPLE)
def test_browsers_are_not_bots(user_agent: str) -> None:
    assert not is_bot(user_agent)
    assert not any(regex.search(user_agent) for regex in UPSTREAM)  # upstream agrees


@pytest.mark.parametrize("user_agent", [None, "", b""])
def test_no_user_agent_is_not_a_known_crawler(user_agent: str | bytes | None) -> None:
    assert is_bot(user_agent) is False


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from(PATTERNS).flatmap(
        lambda pattern: st.tuples(st.just(pattern), st.from_regex(pattern))
    )
)
def test_whatever_an_upstream_pattern_matches_is_a_bot(case: tuple[str, str]) -> None:
    """The literal form over-approximates upstream's regex, never under: a generated
    string that the regex finds (with random text around it) is a bot here."""
    pattern, text = case
    assert re.search(pattern, text, re.IGNORECASE)
    assert _matcher()(text[:MAX_USER_AGENT].lower()) or len(text) > MAX_USER_AGENT


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("Googlebot\\/", [Alternative(("googlebot/",))]),
        ("[wW]get", [Alternative(("wget",))]),
        ("Ahrefs(Bot|SiteAudit)", [Alternative(("ahrefsbot",)), Alternative(("ahrefssiteaudit",))]),
        ("^Silk\\/", [Alternative(("silk/",), start=True)]),
        ("SSL Labs$", [Alternative(("ssl labs",), end=True)]),
        ("(^| )sentry\\/", [Alternative(("sentry/",), start=True), Alternative((" sentry/",))]),
        (
            "AdsBot-Google([^-]|$)",
            [Alternative(("adsbot-google",)), Alternative(("adsbot-google",), end=True)],
        ),
        (
            "BlogTraffic\\/\\d\\.\\d+ Feed-Fetcher",
            [Alternative(("blogtraffic/", ".", " feed-fetcher"))],
        ),
        ("Spider[\\s\\S]*spider\\.com", [Alternative(("spider", "spider.com"))]),
        ("colou?r", [Alternative(("colo", "r"))]),
        ("(?:ab){2,}c", [Alternative(("ab", "c"))]),
    ],
)
def test_literal_forms(pattern: str, expected: list[Alternative]) -> None:
    assert literal_alternatives(pattern) == expected


@pytest.mark.parametrize(
    "pattern",
    ["(?=lookahead)", "\\pL", "a\\", "(open", "close)", "[abc", ".*", "^$", "x^y", "*x", "a{x}"],
)
def test_unknown_syntax_is_refused_loudly(pattern: str) -> None:
    with pytest.raises(BotPatternError):
        literal_alternatives(pattern)


def test_anchored_entries_only_match_at_their_end() -> None:
    assert is_bot("Silk/2.0 (crawler)") and not is_bot("Mozilla/5.0 Silk/131.3.1 like Chrome")
    assert is_bot("Qualys SSL Labs") and not is_bot("SSL Labs report viewer/1.0 Chrome")
    matcher = _matcher()
    assert all(alt.tokens for alt in matcher.complex)


def test_the_matcher_runs_no_backtracking_regex() -> None:
    """The only regex is a trie of literals: no quantifier, no class, so no position is
    tried more than once per token length whatever the input."""
    search = _matcher().search
    assert search is not None
    source = search.__self__.pattern  # type: ignore[attr-defined]
    bare = re.sub(r"\\.", "", source).replace("(?:", "(")
    assert not set(bare) & set("*+?{}[]^$.")


def test_hostile_user_agents_cost_linear_time() -> None:
    matcher = _matcher()
    worst = 0.0
    for text in ("a" * MAX_USER_AGENT, "googlebo" * 128, "adsbot-googl" * 85, "(" * 1024):
        started = time.perf_counter()
        for _ in range(20):
            matcher(text)
        worst = max(worst, (time.perf_counter() - started) / 20)
    assert worst < 0.005  # ~0.15 ms on a 2-vCPU VM; a backtracking blow-up is seconds
    huge = "x" * 1_000_000 + " Googlebot/2.1"
    started = time.perf_counter()
    assert is_bot(huge) is False  # only the first MAX_USER_AGENT characters are looked at
    assert time.perf_counter() - started < 0.05


def test_results_are_memoised_and_the_memo_is_bounded() -> None:
    info = _classify.cache_info()
    assert info.maxsize is not None and info.maxsize <= 4096
    for i in range(info.maxsize + 500):
        is_bot(f"Mozilla/5.0 visitor-{i}")
    assert _classify.cache_info().currsize <= info.maxsize
    hits = _classify.cache_info().hits
    is_bot("Mozilla/5.0 visitor-" + str(info.maxsize + 499))
    assert _classify.cache_info().hits == hits + 1


def test_the_updater_rewrites_this_very_file(tmp_path: Path) -> None:
    """docs/tracking.md's update procedure: upstream's JSON in, this file out."""
    version = re.search(r"crawler-user-agents (\S+), file", LIST_TEXT)
    taken = re.search(r"Taken: (\d{4}-\d{2}-\d{2})\.", LIST_TEXT)
    assert version is not None and taken is not None
    assert render_list(PATTERNS, version=version.group(1), taken=taken.group(1)) == LIST_TEXT
    upstream = tmp_path / "crawler-user-agents.json"
    upstream.write_text(json.dumps([{"pattern": p, "url": ""} for p in PATTERNS]))
    target = tmp_path / "list.txt"
    assert update_bot_list([str(upstream), version.group(1), taken.group(1)], target) == 0
    assert target.read_text(encoding="utf-8") == LIST_TEXT


def test_the_updater_refuses_an_entry_it_cannot_compile(tmp_path: Path) -> None:
    upstream = tmp_path / "crawler-user-agents.json"
    upstream.write_text(json.dumps([{"pattern": "Googlebot"}, {"pattern": "(?<!x)bot"}]))
    target = tmp_path / "list.txt"
    with pytest.raises(BotPatternError, match="unsupported group"):
        update_bot_list([str(upstream), "9.9.9"], target)
    assert not target.exists()
