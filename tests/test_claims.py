"""Split/convert prompts (byte for byte, METHOD.md §3), the bullet parser and the LLM claim extractor."""
import pytest

from rlaifv_jax.data.chat import labeler_question

from rlaifv_jax.feedback.claims import (
    CLAIM_LLM_DECODING,
    ClaimResult,
    LLMClaimExtractor,
    convert_prompt,
    parse_bullets,
    split_prompt,
)

# Copied from METHOD.md §3 (the code fence's final newline is not part of the prompt).
SPLIT_EXPECTED = """You are an expert in extracting facts from the given question-answer pair for an image. Your task is to extract and rewrite the facts mentioned in the question-answer pair into self-contained sentences. Exclude opinions or subjective statements.

You should present your result in the following format:
### Facts:
- {Extracted fact 1}
- {Extracted fact 2}
- ...

### Question-answer pair:
Question: What is on the table?
Answer: A red cup.  It is full."""

CONVERT_EXPECTED = """You are an expert at modifying a given declarative sentence into a general question sentence. Your task is to modify the given declarative sentences one by one into a general question form. Do not change tenses or add extra content.
    If the given declarative sentence contains not, no or negative meaning words, you need to check the modified general interrogative sentence to make sure that the generated general question sentence retains words with not , no or negative meaning words.

You should present your result in the following format:
### Modified sentences:
- {Modified sentence 1}
- {Modified sentence 2}
- ...

### Declarative sentences:
- There is a red cup.

- The cup is full.
"""


def test_split_prompt_byte_exact():
    assert split_prompt("What is on the table?", "A red cup.  It is full.") == SPLIT_EXPECTED


def test_convert_prompt_byte_exact():
    assert convert_prompt(["There is a red cup.", "The cup is full."]) == CONVERT_EXPECTED
    assert convert_prompt([]).endswith("### Declarative sentences:")


def test_split_prompt_truncated_to_300_space_separated_words():
    # Template + "Question: Q\nAnswer:" is 56 space-separated words ("pair:\nQuestion:" and
    # "Q\nAnswer:" are one word each: newlines do not separate), so 244 answer words remain.
    answer = " ".join(f"a{i}" for i in range(1000))
    prompt = split_prompt("Q", answer)
    assert prompt.endswith("\nAnswer: a0 a1 a2" + "".join(f" a{i}" for i in range(3, 244)))
    assert len(prompt.split(" ")) == 300
    # A double space is an empty word and is kept when inside the limit.
    short = split_prompt("Q", "x  y")
    assert short.endswith("Answer: x  y")


def test_labeler_question():
    assert labeler_question("Is there a cup?") == "Is there a cup? Please answer yes or no."


def test_parse_bullets():
    text = "### Facts:\n- There is a cup.\n\n-   The cup is red. \n   \n- \n### end\n* A dog sits."
    assert parse_bullets(text) == ["There is a cup.", "The cup is red.", "A dog sits."]
    assert parse_bullets("") == []
    assert parse_bullets("\n\n### Facts:\n") == []


def test_decoding_defaults():
    assert (CLAIM_LLM_DECODING.temperature, CLAIM_LLM_DECODING.top_p, CLAIM_LLM_DECODING.max_new_tokens) == (0.2, 0.9, 256)


class FakeLLM:
    """Answers split prompts and convert prompts from fixed tables; records every batch."""

    def __init__(self, split_out, convert_out):
        self.split_out, self.convert_out, self.calls = split_out, convert_out, []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        outs = []
        for p in prompts:
            if p.startswith("You are an expert in extracting"):
                outs.append(self.split_out[p.rsplit("\nAnswer: ", 1)[1]])
            else:
                outs.append(self.convert_out[p.split("### Declarative sentences:", 1)[1]])
        return outs


def test_llm_extractor_statuses_and_batching():
    llm = FakeLLM(
        split_out={
            "ok answer": "### Facts:\n- A cup is red.\n- A dog sits.",
            "mismatch answer": "- A cat sleeps.\n- A hat is blue.",
            "nothing answer": "### Facts:\n",
            "chatty answer": "Here are the facts:\n- A bird flies.",
        },
        convert_out={
            "\n- A cup is red.\n\n- A dog sits.\n": "### Modified sentences:\n- Is a cup red?\n- Does a dog sit?",
            "\n- A cat sleeps.\n\n- A hat is blue.\n": "- Does a cat sleep?",
        },
    )
    items = [("q", "ok answer"), ("q", "  "), ("q", "mismatch answer"), ("q", "nothing answer"),
             ("q", "chatty answer")]
    res = LLMClaimExtractor(llm).extract(items)
    assert [r.status for r in res] == ["ok", "no_claims", "count_mismatch", "no_claims", "unparseable"]
    assert res[0].facts == ["A cup is red.", "A dog sits."]
    assert res[0].questions == ["Is a cup red?", "Does a dog sit?"]
    for r in res[1:]:
        assert r.facts == [] and r.questions == []
    assert res[2].raw_convert == "- Does a cat sleep?"  # kept for auditing
    # One batched split call (the blank answer skipped), one batched convert call (only usable splits).
    assert [len(c) for c in llm.calls] == [4, 2]
    assert ClaimResult.from_dict(res[0].to_dict()) == res[0]


def test_llm_extractor_separate_convert_model_and_bad_batch():
    split = FakeLLM({"a": "- A cup."}, {})
    convert = FakeLLM({}, {"\n- A cup.\n": "- Is there a cup?"})
    (r,) = LLMClaimExtractor(split, convert).extract([("q", "a")])
    assert r.status == "ok" and r.questions == ["Is there a cup?"]
    assert len(split.calls) == 1 and len(convert.calls) == 1
    with pytest.raises(ValueError, match="completions"):
        LLMClaimExtractor(lambda prompts: []).extract([("q", "a")])


def test_claims_llm_batch_size_and_continuous_slots_change_no_result(tmp_path):
    """The claims stage's real LLM path (a tiny random Llama): decoding 1 or 8 messages together
    (``claims.llm_batch_size``), or 8 through 3 continuous slots (``claims.decode_rows``), gives the
    same completions, hence the same claims."""
    import tiny_hf
    from rlaifv_jax.core.sharding import serve_mesh
    from rlaifv_jax.stages import claims as claims_stage
    tiny_hf.llama(tmp_path / "llm", seed=3)
    tiny_hf.word_tokenizer(tmp_path / "llm")
    items = [("describe the image .", " ".join(f"w{(7 * i + j) % 75}" for j in range(3 + i))) for i in range(5)]
    results = []
    for rows, slots in ((1, None), (8, None), (8, 3)):
        settings = claims_stage.ClaimSettings(kind="llm", split_path=str(tmp_path / "llm"), llm_batch_size=rows,
                                              decode_rows=slots)
        with claims_stage.extractor(settings, None, serve_mesh(), seed=0) as ex:
            results.append([r.to_dict() for r in ex.extract(items)])
    assert results[0] == results[1] == results[2]
    assert all(r["raw_split"] for r in results[0])  # the LLM really answered every item


def test_claims_stage_tokenizes_the_next_chunk_ahead_and_changes_no_result(tmp_path):
    """The claims stage tokenizes the next chunk's split messages on a helper thread (the split LLM's
    ``prepare``); its records equal one ``extract`` over every item, and a prepared message's ids are
    taken (and dropped) by the call that decodes it, giving the same completions as tokenizing then."""
    import tiny_hf
    from rlaifv_jax.core.sharding import serve_mesh
    from rlaifv_jax.stages import claims as claims_stage
    tiny_hf.llama(tmp_path / "llm", seed=3)
    tiny_hf.word_tokenizer(tmp_path / "llm")
    samples = [{"key": f"p{i}", "question": "describe the image .",
                "responses": [" ".join(f"w{(7 * i + j) % 75}" for j in range(2 + i)), "", "w3 w4"]} for i in range(5)]
    settings = claims_stage.ClaimSettings(kind="llm", split_path=str(tmp_path / "llm"), batch_size=2, llm_batch_size=4)
    got = claims_stage.run(str(tmp_path / "stage"), samples, settings, world=None, mesh=serve_mesh(), seed=0,
                           progress=False)
    with claims_stage.extractor(settings, None, serve_mesh(), seed=0) as ex:
        want = ex.extract([(s["question"], r) for s in samples for r in s["responses"]])
        llm, messages = ex.split_generate, ex.split_messages([(s["question"], s["responses"][0]) for s in samples])
        fresh = llm(messages)
        llm.prepare(messages)
        assert set(llm.ready) == set(messages)
        assert llm(messages) == fresh and not llm.ready
    flat = [c for rec in sorted(got, key=lambda r: r["key"]) for c in rec["claims"]]
    assert flat == [r.to_dict() for r in want]
    assert sum(c["status"] == "no_claims" for c in flat) >= 5  # the empty responses: no LLM call
