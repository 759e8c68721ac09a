"""A judge behind any OpenAI-compatible chat-completions API, through the official `openai` client.

The client sends the request (the key in the Authorization header, the connect and read timeouts)
and reads the reply into typed objects and typed errors. Its own retries are switched off
(`max_retries=0`) because this judge's retry policy does what the client's cannot:
- retries with exponential backoff on 408/409/429/5xx, timeouts and connection errors, honouring a
  Retry-After header up to `max_retry_after` seconds (a longer one fails the judgement at once,
  saying how long the server asked for; the client would fall back to its own short backoff) and up
  to `patience` seconds of waiting per judgement in all (the client has no budget for the waits);
  a long wait is logged as a warning with its length, never slept silently; other 4xx fail at once;
- a reply that is not a chat completion is retried like a server error (the client raises on it);
- a rate limit (requests per minute) shared by the worker threads, applied to every attempt, and a
  thread pool for concurrency;
- the key comes from OPENAI_API_KEY (or the constructor) and is never logged, cached, or part of an
  error message (server text is redacted too); a base URL carrying credentials (user:password@, or a
  key in the query) is refused, so the key travels in the Authorization header only;
- a judgement cache (successful judgements only) so a rerun never pays twice;
- a reply without a score, or with a score outside the rubric's range, is a failed judgement,
  reported as such (saying which).
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import mimetypes
import os
import random
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from openai import APIConnectionError, APIStatusError, OpenAI

from eval.core.cache import Cache, content_key, file_hash
from eval.judges.base import RUBRIC_VERSION, JudgeError, JudgeRequest, Judgement, read_score, rubric_prompt, score_error

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}
LONG_WAIT_S = 10.0           # waits at least this long are logged as warnings
SECRET_QUERY_WORDS = ("key", "token", "secret", "password", "auth", "sig")


class MalformedReply(ValueError):
    """A successful HTTP reply that holds no chat completion text."""


class RateLimiter:
    """At most `per_minute` request starts per minute, spaced evenly, across threads."""

    def __init__(self, per_minute: float) -> None:
        if per_minute <= 0:
            raise JudgeError(f"requests_per_minute must be > 0, got {per_minute}")
        self.interval = 60.0 / per_minute
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def check_base_url(url: str) -> str:
    """`url` without a trailing slash; a JudgeError (which never repeats the URL's secret) when it
    carries credentials or is not http(s)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JudgeError(f"judge openai: base URL {_public_url(url)!r} is not an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise JudgeError(f"judge openai: the base URL {_public_url(url)!r} carries credentials (user:password@); "
                         "remove them and put the key in OPENAI_API_KEY, which only ever travels in the "
                         "Authorization header")
    names = [k for k, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
    secret = [k for k in names if any(word in k.lower() for word in SECRET_QUERY_WORDS)]
    if secret:
        raise JudgeError(f"judge openai: the base URL {_public_url(url)!r} carries a credential in its query "
                         f"({secret[0]}=...); remove it and put the key in OPENAI_API_KEY")
    return url.rstrip("/")


def _public_url(url: str) -> str:
    """The URL without user info or query string (never part of a cache key or log otherwise)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


class OpenAIJudge:
    """Scores answers 1-10 with a chat model behind an OpenAI-compatible API."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 cache: Cache | None = None, max_workers: int = 4, requests_per_minute: float = 60.0,
                 max_retries: int = 5, timeout: float = 60.0, backoff: float = 1.0, max_backoff: float = 60.0,
                 max_retry_after: float = 300.0, patience: float = 900.0, send_images: bool = True,
                 temperature: float = 0.0, max_tokens: int = 256, score_retries: int = 1) -> None:
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        if not key:
            raise JudgeError("judge openai: OPENAI_API_KEY is not set (the key is read from the environment "
                             "and never written anywhere)")
        self.__key = key
        self.model = model
        self.base_url = check_base_url(base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL)
        self.name = f"openai:{model}"
        self.cache = cache
        self.max_workers = max(1, int(max_workers))
        self.limiter = RateLimiter(requests_per_minute)
        self.max_retries = int(max_retries)
        self.timeout = float(timeout)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_retry_after = float(max_retry_after)
        self.patience = float(patience)
        for name in ("timeout", "backoff", "max_backoff", "max_retry_after", "patience"):
            if not getattr(self, name) >= 0:
                raise JudgeError(f"judge option {name!r}: must be >= 0, got {getattr(self, name)}")
        self.send_images = bool(send_images)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.score_retries = int(score_retries)
        self.requests_sent = 0
        self._count_lock = threading.Lock()
        self._client = OpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout, max_retries=0)

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r}, base_url={_public_url(self.base_url)!r})"

    # -- helpers ------------------------------------------------------------------------------
    def _redact(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key else text

    def _messages(self, request: JudgeRequest) -> list[dict]:
        system, user = rubric_prompt(request)
        content: list[dict] | str = user
        if self.send_images and request.images:
            parts: list[dict] = [{"type": "text", "text": user}]
            for path in request.images:
                mime = mimetypes.guess_type(str(path))[0] or "image/png"
                data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
                parts.append({"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}})
            content = parts
        return [{"role": "system", "content": system}, {"role": "user", "content": content}]

    def cache_key(self, request: JudgeRequest) -> str:
        system, user = rubric_prompt(request)
        images = [file_hash(p) for p in request.images] if self.send_images else []
        return content_key("judge/openai", RUBRIC_VERSION, _public_url(self.base_url), self.model, system, user,
                           images, self.temperature, self.max_tokens)

    def _send(self, request: JudgeRequest) -> str:
        """One chat completion's reply text (one attempt: the client makes no retries of its own)."""
        with self._count_lock:
            self.requests_sent += 1
        try:
            completion = self._client.chat.completions.create(
                model=self.model, messages=self._messages(request), temperature=self.temperature,
                max_tokens=self.max_tokens)
        except json.JSONDecodeError as exc:
            raise MalformedReply(f"JSONDecodeError reading the reply: {exc.msg}") from None
        return self._reply_text(completion)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        base = min(self.max_backoff, self.backoff * (2 ** attempt))
        return base + random.uniform(0, 0.1 * base)

    def _too_long(self, delay: float, retry_after: float | None, waited: float) -> str | None:
        """Why waiting `delay` more seconds is refused (None: wait)."""
        if retry_after is not None and retry_after > self.max_retry_after:
            return (f"the server asked to retry after {retry_after:.0f} s, over max_retry_after="
                    f"{self.max_retry_after:g} s; not waiting (raise max_retry_after to wait that long)")
        if waited + delay > self.patience:
            return (f"waiting {delay:.0f} s more would exceed patience={self.patience:g} s for one judgement "
                    f"(already waited {waited:.0f} s); giving up")
        return None

    def _complete(self, request: JudgeRequest) -> tuple[str | None, str | None]:
        """(reply text, None) or (None, reason) after retries."""
        last = "no attempt made"
        waited = 0.0
        for attempt in range(self.max_retries + 1):
            self.limiter.wait()
            retry_after = None
            try:
                return self._send(request), None
            except MalformedReply as exc:
                last = f"malformed reply ({exc})"
            except APIStatusError as exc:
                body = self._redact(exc.response.text)[:200]
                if exc.status_code not in RETRY_STATUSES:
                    return None, f"HTTP {exc.status_code} (not retried): {body}"
                retry_after = retry_after_seconds(exc.response.headers.get("retry-after"))
                last = f"HTTP {exc.status_code}: {body}"
            except APIConnectionError as exc:        # timeouts too (APITimeoutError)
                reason = exc.__cause__ or exc
                last = f"network error ({type(reason).__name__}: {self._redact(str(reason))[:200]})"
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                refused = self._too_long(delay, retry_after, waited)
                if refused is not None:
                    log.warning("judge %s: %s: %s", self.model, last.split(":")[0], refused)
                    return None, f"{last}; {refused}"
                level = logging.WARNING if delay >= LONG_WAIT_S else logging.INFO
                log.log(level, "judge %s: attempt %d failed (%s); waiting %.2f s before retrying%s", self.model,
                           attempt + 1, last.split(":")[0], delay,
                           " (the server's Retry-After)" if retry_after is not None else "")
                time.sleep(delay)
                waited += delay
        return None, f"gave up after {self.max_retries + 1} attempts: {last}"

    @staticmethod
    def _reply_text(completion) -> str:
        """choices[0].message.content (text, or text parts joined); MalformedReply when there is none.
        Replies are not validated against the API's schema, so any part of that path may be missing."""
        try:
            content = completion.choices[0].message.content
        except (AttributeError, IndexError, KeyError, TypeError) as exc:
            raise MalformedReply(f"{type(exc).__name__} reading choices[0].message.content") from None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise MalformedReply("content is not text")
        return content

    def _judge_one(self, request: JudgeRequest) -> Judgement:
        key = self.cache_key(request)
        if self.cache is not None:
            hit = self.cache.get(key, require=("score", "raw"))
            if hit is not None:
                return Judgement(score=hit["score"], raw=hit["raw"], cached=True)
        error = "no reply"
        for _ in range(self.score_retries + 1):
            text, error_or_none = self._complete(request)
            if text is None:
                return Judgement(score=None, error=error_or_none)
            score, problem = read_score(text)
            if score is not None:
                if self.cache is not None:
                    self.cache.put(key, {"score": score, "raw": text})
                return Judgement(score=score, raw=text)
            error = score_error(self._redact(text), problem)
        return Judgement(score=None, error=error, raw=self._redact(text or ""))

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        """Judge concurrently (`max_workers` threads, shared rate limit); order is kept."""
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(self._judge_one, requests))
