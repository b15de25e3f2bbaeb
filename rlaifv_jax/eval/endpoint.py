"""A judge behind any OpenAI-compatible chat endpoint (OpenAI, vLLM, SGLang, TGI), standard library only.

``EndpointJudge(url, model)(prompts) → replies`` POSTs each prompt as one chat message to
``{url}/chat/completions`` (``url`` as given to OpenAI clients, e.g. ``http://HOST:PORT/v1``), with
the suite's official role, temperature and ``max_tokens``. The key is read from an environment
variable and sent only as the ``Authorization`` header: it is never stored, logged or returned, and
is masked out of any error text the server sends back.

* Retries: HTTP 429 and 5xx, connection errors and timeouts are retried with exponential backoff
  (``backoff_s · 2^attempt``, at most ``max_backoff_s``; a ``Retry-After`` header wins when longer),
  up to ``retries`` times; any other HTTP error stops at once. Each request has a ``timeout_s``.
* Concurrency: at most ``concurrency`` requests in flight (a thread pool).
* Cache: every reply is written to ``cache_dir`` as soon as it arrives (one small JSON file per
  request, written atomically), keyed by the model and the exact request (messages, temperature,
  max_tokens), and for a re-ask (``attempt`` k > 0, when a sampled reply could not be used) by k too.
  A rerun, or a run after a crash, sends only the prompts not answered yet.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class JudgeError(ValueError):
    """The endpoint could not answer (one line, no key in it)."""


def public_url(url: str) -> str:
    """``url`` without any ``user:password@`` part (what may be written to OUT.json and logs)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


class EndpointJudge:
    """``judge(prompts) → replies`` through an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, url: str, model: str, *, cache_dir: str, key_env: str = "OPENAI_API_KEY",
                 role: str = "user", temperature: float = 0.0, max_tokens: int = 512, timeout_s: float = 60.0,
                 retries: int = 6, backoff_s: float = 1.0, max_backoff_s: float = 60.0, concurrency: int = 8):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--judge_url {public_url(url) if parts.hostname else url!r}: expected "
                             "http(s)://HOST[:PORT]/v1")
        if concurrency < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError("judge concurrency must be >= 1, retries >= 0 and timeout > 0")
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.role, self.temperature, self.max_tokens = model, role, temperature, max_tokens
        self.timeout_s, self.retries, self.backoff_s, self.max_backoff_s = timeout_s, retries, backoff_s, max_backoff_s
        self.concurrency, self.cache_dir, self.key_env = concurrency, cache_dir, key_env
        self._key = os.environ.get(key_env) or None
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0, "replied_models": []}

    def settings(self) -> dict[str, Any]:
        """What OUT.json records about this judge (never the key)."""
        return {"kind": "endpoint", "url": public_url(self.endpoint.rsplit("/chat/completions", 1)[0]),
                "model": self.model, "role": self.role, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "key_env": self.key_env, "key_set": self._key is not None,
                "cache": self.cache_dir, **self.stats, "replied_models": sorted(self.stats["replied_models"])}

    # -------------------------------------------------------------------------------------------- cache
    def _body(self, prompt: str) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": self.role, "content": prompt}],
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _path(self, body: dict[str, Any], attempt: int = 0) -> str:
        keyed = {**body, "attempt": attempt} if attempt else body  # a re-ask is another sample, cached apart
        key = hashlib.sha256(json.dumps(keyed, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return os.path.join(self.cache_dir, key[:2], key + ".json")

    def _cached(self, path: str) -> str | None:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)["reply"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent, or torn by a crash that the atomic write did not cover: ask again

    @staticmethod
    def _store(path: str, record: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    # -------------------------------------------------------------------------------------------- requests
    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def _ask(self, body: dict[str, Any]) -> tuple[str, str | None]:
        """The reply to one request, retrying what can succeed later."""
        for attempt in range(self.retries + 1):
            wait, why = min(self.max_backoff_s, self.backoff_s * 2 ** attempt), ""
            try:
                with self._lock:
                    self.stats["requests"] += 1
                data = self._post(body)
                return str(data["choices"][0]["message"]["content"]), data.get("model")
            except urllib.error.HTTPError as e:
                detail = self._redact(e.read().decode("utf-8", "replace"))[:200].replace("\n", " ")
                if e.code != 429 and e.code < 500:
                    raise JudgeError(f"judge endpoint {public_url(self.endpoint)}: HTTP {e.code} ({detail})") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = max(wait, min(float(retry_after), self.max_backoff_s))
                why = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                why = self._redact(type(e).__name__ + (f": {e.reason}" if isinstance(e, urllib.error.URLError) else ""))
            except (ValueError, KeyError, IndexError, TypeError):
                why = "a reply that is not a chat completion"
            if attempt == self.retries:
                raise JudgeError(f"judge endpoint {public_url(self.endpoint)}: {why} after {self.retries + 1} tries")
            with self._lock:
                self.stats["retries"] += 1
            logging.warning("judge endpoint: %s; retrying in %.2f s (try %d of %d)", why, wait, attempt + 2,
                            self.retries + 1)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _answer(self, prompt: str, attempt: int = 0) -> str:
        body = self._body(prompt)
        path = self._path(body, attempt)
        reply, model = self._ask(body)
        self._store(path, {"model": self.model, "replied_model": model, "reply": reply})
        if model and model != self.model:
            logging.warning("judge endpoint: asked for %s, %s replied", self.model, model)
        with self._lock:
            if model and model not in self.stats["replied_models"]:
                self.stats["replied_models"].append(model)
        return reply

    @property
    def samples(self) -> bool:
        """Whether asking again can give another reply (temperature > 0)."""
        return self.temperature > 0

    def __call__(self, prompts: list[str], attempt: int = 0) -> list[str]:
        """The replies to ``prompts``; ``attempt`` k > 0 asks again for a k-th sample (cached apart)."""
        replies: dict[str, str] = {}
        for p in dict.fromkeys(prompts):
            cached = self._cached(self._path(self._body(p), attempt))
            if cached is not None:
                replies[p] = cached
        todo = [p for p in dict.fromkeys(prompts) if p not in replies]
        self.stats["cache_hits"] += len(prompts) - sum(1 for p in prompts if p in todo)
        logging.info("judge %s: %d prompts, %d from the cache, %d to ask", self.model, len(prompts),
                     len(prompts) - len(todo), len(todo))
        if todo:
            with concurrent.futures.ThreadPoolExecutor(min(self.concurrency, len(todo))) as pool:
                for p, reply in zip(todo, pool.map(lambda p: self._answer(p, attempt), todo)):
                    replies[p] = reply
        return [replies[p] for p in prompts]
