"""``evaluation/frames_check.py`` (gpu_check.sh's ``frames`` step): at toy size on CPU here, at the
Qwen2-0.5B shape on a GPU with ``-m gpu``."""

from __future__ import annotations

import pytest
import torch

from rcllm_sdk.evaluation.frames_check import (
    check_bf16,
    check_fp32,
    frames_world,
    random_ranker,
    run_check,
    ttft,
)


@pytest.fixture(scope="module")
def world():
    return frames_world(users=6, items=40, history=8)


def test_bf16_exact_policy_keeps_every_clear_top1_of_full(world):
    users, items = world
    report = check_bf16(random_ranker("tiny", items, "cpu", torch.bfloat16), users, items, "cpu")
    assert report["passed"] and report["clear_margin_users"] > 0


def test_fp32_modes_match_full_and_the_default_policy_reuses_blocks(world):
    users, items = world
    ranker = random_ranker("tiny", items, "cpu", torch.float32)
    report = check_fp32(ranker, users, items, "cpu")
    assert report["passed"], report
    assert report["max_abs_score_diff"]["rcllm:full"] < 1e-4
    timing = ttft(ranker, users, items, "cpu", "float32")
    assert set(timing["ttft_p50_ms"]) == {"full", "prefix", "rcllm"} and timing["rcllm_vs_full"] > 0


@pytest.mark.gpu
def test_qwen_half_billion_shape_served_through_from_frames_on_cuda():
    report = run_check("qwen-0.5b", "cuda", users=64, items=200)
    assert report["passed"], report
