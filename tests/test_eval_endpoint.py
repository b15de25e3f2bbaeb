"""The judge behind an OpenAI-compatible endpoint, against a local stub server on 127.0.0.1.

The stub answers ``POST /v1/chat/completions`` with canned replies, after a 429, a 500 and a request
that outlasts the client's timeout. It listens on a free port, serves at most a bounded number of
requests and shuts itself down after a few seconds at the latest.
"""
import http.server
import json
import logging
import os
import re
import threading
import time

import pytest

from rlaifv_jax import evaluate
from rlaifv_jax.eval.endpoint import EndpointJudge, JudgeError

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval")
KEY = "sk-test-ONLY-IN-THE-ENVIRONMENT-1234"


class Stub:
    """A scripted chat-completions server: ``faults`` are served first (an HTTP code, or "timeout"), then
    ``reply(request) → content``."""

    def __init__(self, reply, faults=(), max_requests=50, lifetime_s=30.0, delay_s=1.0):
        self.requests, self.faults, self.reply = [], list(faults), reply
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    fault = stub.faults.pop(0) if stub.faults else None
                    over = len(stub.requests) > max_requests
                if over or fault in (429, 500, 401):
                    code = 503 if over else fault
                    self.send_response(code)
                    self.end_headers()
                    self.wfile.write(json.dumps({"error": {"message": f"no ({body['model']})"}}).encode())
                    return
                if fault == "timeout":
                    time.sleep(delay_s)  # longer than the client's timeout: it gives up and retries
                data = {"model": body["model"], "choices": [{"message": {"role": "assistant",
                                                                          "content": stub.reply(body)}}]}
                payload = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client timed out and closed the connection

        lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.stopper = threading.Timer(lifetime_s, self.server.shutdown)  # stops itself whatever the test does

    def __enter__(self):
        self.thread.start()
        self.stopper.start()
        return self

    def __exit__(self, *exc):
        self.stopper.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def _mmhal_reply(body):
    prompt = body["messages"][0]["content"]
    response = prompt.split("### LMM Response to Evaluate\n")[1]
    return "Explanation: fine.\nRating: 5" if "sleeping" in response else "There is no such object. Rating: 1"


def _evaluate(tmp_path, suite, data, answers, url, *extra):
    out = tmp_path / f"{suite}.json"
    rc = evaluate.main(["evaluate", f"--suite={suite}", f"--data={data}", f"--out={out}", f"--answers={answers}",
                        f"--judge_url={url}", "--judge_model=stub-judge", "--judge_key_env=RLAIFV_TEST_JUDGE_KEY",
                        "--judge_timeout=0.3", "--judge_concurrency=2", "--noprogress", *extra])
    return rc, out


def test_mmhal_through_endpoint_with_faults_then_cached(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("RLAIFV_TEST_JUDGE_KEY", KEY)
    monkeypatch.setattr(EndpointJudge, "__init__", _fast_backoff(EndpointJudge.__init__))
    caplog.set_level(logging.INFO)
    data = os.path.join(FIX, "mmhal", "response_template.json")
    answers = os.path.join(FIX, "answers", "mmhal.jsonl")
    with Stub(_mmhal_reply, faults=[429, 500, "timeout"]) as stub:
        rc, out = _evaluate(tmp_path, "mmhal", data, answers, stub.url)
        first = len(stub.requests)
        result = json.loads(out.read_text())
        rc2, _ = _evaluate(tmp_path, "mmhal", data, answers, stub.url)
        second = len(stub.requests) - first
    assert rc == 0 and rc2 == 0
    # 4 prompts; the 429, the 500 and the timed-out request were each retried once
    assert first == 4 + 3 and second == 0  # the rerun is answered by the cache alone
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == f"Bearer {KEY}" for r in stub.requests)
    body = stub.requests[-1]["body"]
    assert body["model"] == "stub-judge" and body["temperature"] == 0.0 and body["max_tokens"] == 512
    assert body["messages"][0]["role"] == "user" and "### LMM Response to Evaluate" in body["messages"][0]["content"]
    m = result["metrics"]
    assert m["n"] == 4 and m["n_unparseable"] == 0
    ratings = [i["rating"] for i in result["items"]]
    assert m["score"] == pytest.approx(sum(ratings) / 4) and 5 in ratings and 1 in ratings
    judge = result["judge"]
    assert judge["kind"] == "endpoint" and judge["url"] == stub.url and judge["model"] == "stub-judge"
    assert judge["retries"] == 3 and judge["requests"] == 7 and judge["key_set"] is True
    rerun = json.loads(out.read_text())["judge"]
    assert rerun["cache_hits"] == 4 and rerun["requests"] == 0 and rerun["retries"] == 0
    # the key is sent, but never written or logged
    cache_files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert any(f.endswith(".json") and ".judge_cache" in f for f in cache_files)
    for path in cache_files:
        assert KEY not in open(path, encoding="utf-8").read()
    captured = capsys.readouterr()
    assert KEY not in caplog.text + captured.out + captured.err
    assert "HTTP 429" in caplog.text and "HTTP 500" in caplog.text and "retrying" in caplog.text


def _fast_backoff(init):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.backoff_s = 0.01
    return wrapped


def test_object_halbench_extraction_as_the_official_script_asks(tmp_path, monkeypatch):
    """System message, temperature 0.2, as eval_gpt_obj_halbench.py; --protocol paper refuses without a judge."""
    monkeypatch.delenv("RLAIFV_TEST_JUDGE_KEY", raising=False)
    data = os.path.join(FIX, "object_halbench")
    answers = os.path.join(FIX, "answers", "object_halbench.jsonl")

    asked = []

    def extract(body):
        answer = re.search(r"\[Start of Examiner's Answer\]\n\n(.*)\n\n\[End", body["messages"][0]["content"], re.S)
        asked.append(answer.group(1))
        if "fire hydrant" in answer.group(1) and asked.count(answer.group(1)) == 1:
            return "Sure! The objects are a car and a hydrant."  # unparseable: asked again, as officially
        return json.dumps([w for w in ("dog", "frisbee", "cat", "couch", "car") if w in answer.group(1)])

    with Stub(extract) as stub:
        rc, out = _evaluate(tmp_path, "object_halbench", data, answers, stub.url, "--protocol=paper")
    result = json.loads(out.read_text())
    assert rc == 0 and result["protocol"] == "paper" and result["scoring"] == "judge (extraction)"
    assert all(r["auth"] is None for r in stub.requests)  # no key in the environment: none sent
    body = stub.requests[0]["body"]
    assert body["messages"][0]["role"] == "system" and body["temperature"] == 0.2
    assert len(stub.requests) == 4 + 1  # four answers of > 3 words, one re-ask
    m = result["metrics"]
    assert m["extractor"] == "llm" and m["n_extraction_failed"] == 0
    # 101: dog, frisbee (true); 202: cat, couch (true); 303: car (true); 404: nothing
    assert m["mention_hall"] == 0.0 and m["response_hall"] == 0.0


@pytest.mark.parametrize("suite,data,message", [
    ("object_halbench", os.path.join(FIX, "object_halbench"),
     "--protocol paper extracts objects with a judge: pass --judge_url URL --judge_model NAME (the paper's: "
     "gpt-3.5-turbo-0613"),
    ("mmhal", os.path.join(FIX, "mmhal", "response_template.json"), "is scored by a judge LLM: pass --judge_url"),
])
def test_paper_protocol_needs_its_judge(tmp_path, capsys, suite, data, message):
    answers = os.path.join(FIX, "answers", f"{suite}.jsonl")
    rc = evaluate.main(["evaluate", f"--suite={suite}", f"--data={data}", f"--out={tmp_path / 'o.json'}",
                        f"--answers={answers}", "--protocol=paper"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_default_protocol_is_labelled_rule_based(tmp_path):
    out = tmp_path / "o.json"
    rc = evaluate.main(["evaluate", "--suite=object_halbench", f"--data={os.path.join(FIX, 'object_halbench')}",
                        f"--out={out}", f"--answers={os.path.join(FIX, 'answers', 'object_halbench.jsonl')}"])
    result = json.loads(out.read_text())
    assert rc == 0 and result["protocol"] == "default" and result["scoring"].startswith("rule: CHAIR")
    assert "judge" not in result


def test_unrecoverable_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RLAIFV_TEST_JUDGE_KEY", KEY)
    with Stub(lambda body: "Rating: 3", faults=[401]) as stub:
        judge = EndpointJudge(stub.url, "m", cache_dir=str(tmp_path / "c"), key_env="RLAIFV_TEST_JUDGE_KEY")
        with pytest.raises(JudgeError, match=r"HTTP 401") as e:
            judge(["p"])
        assert KEY not in str(e.value) and len(stub.requests) == 1  # a 401 is not retried
    with Stub(lambda body: "x", faults=[500, 500]) as stub:
        judge = EndpointJudge(stub.url, "m", cache_dir=str(tmp_path / "c"), retries=1, backoff_s=0.01)
        with pytest.raises(JudgeError, match=r"HTTP 500 after 2 tries"):
            judge(["p"])
    with pytest.raises(ValueError, match="expected http"):
        EndpointJudge("localhost:8000", "m", cache_dir=str(tmp_path))


@pytest.mark.parametrize("extra,message", [
    (["--protocol=paper", "--num_beams=1", "--limit=2"], "--protocol paper uses the official questions and decoding; "
                                                         "drop --num_beams, --limit"),
    (["--judge_url=http://127.0.0.1:9/v1"], "--judge_url and --judge_model go together"),
    (["--judge_url=http://127.0.0.1:9/v1", "--judge_model=m", "--judge=/x"], "give one judge"),
])
def test_judge_and_protocol_flags_are_checked(tmp_path, capsys, extra, message):
    rc = evaluate.main(["evaluate", "--suite=pope", f"--data={os.path.join(FIX, 'pope', 'coco_pope_random.json')}",
                        f"--out={tmp_path / 'o.json'}", f"--answers={os.path.join(FIX, 'answers', 'pope.jsonl')}",
                        *extra])
    assert rc == 2 and message in capsys.readouterr().err
