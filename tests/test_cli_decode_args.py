"""The shared decode flags: defaults of the official generate, one validation with one-line
refusals naming the flag, and the layout / quota arithmetic (hand-computed)."""

import argparse
import math

import pytest

from tidesim.cli.decode_args import DecodeDefaults, add_decode_args, decode_kwargs
from tidesim.decode import check_decode, effective_steps, layout, transfer_schedule
from tidesim.errors import InputError


def parse(*argv, sampling=True, defaults=None):
    p = argparse.ArgumentParser()
    add_decode_args(p, defaults or DecodeDefaults(), sampling=sampling)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(list(argv))


def test_defaults_are_the_official_ones():
    kw = decode_kwargs(parse())
    assert kw == {"gen_length": 256, "block_length": 32, "steps": 32, "threshold": 0.95, "minimal_topk": 1,
                  "eos_early_stop": False, "kv_cache": "none", "temperature": 0.0, "top_k": None, "top_p": None,
                  "do_sample": False, "seed": 0}
    short = decode_kwargs(parse(sampling=False, defaults=DecodeDefaults(gen_length=1024, kv_cache="prefix")))
    assert "temperature" not in short and short["gen_length"] == 1024 and short["kv_cache"] == "prefix"


@pytest.mark.parametrize("argv, words", [
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--threshold", "inf"], "--threshold must be a finite number"),
    (["--threshold", "0"], "--threshold must lie in (0, 1]"),
    (["--top-p", "-0.1"], "--top-p must lie in [0, 1]"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--gen-length", "8", "--minimal-topk", "9"], "--minimal-topk 9 exceeds --gen-length 8"),
    (["--block-length", "0"], "--block-length must be an integer >= 1"),
])
def test_bad_values_are_refused_naming_the_flag(argv, words):
    with pytest.raises(InputError) as err:
        decode_kwargs(parse(*argv))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_library_names_are_fields():
    with pytest.raises(InputError, match="^temperature must be a finite number"):
        check_decode(16, temperature=math.inf)


def test_layout_quota_and_step_cap_hand_computed():
    assert layout(20, 24, 16) == (1, 3)  # N = ceil(44 / 16) = 3 blocks; decoding starts at 20 // 16 = 1
    assert layout(32, 256, 32) == (1, 9)
    assert layout(5, 16, 8) == (0, 3)
    assert transfer_schedule(32, 5).tolist() == [7, 7, 6, 6, 6]
    assert transfer_schedule(16, 5).tolist() == [4, 3, 3, 3, 3]
    assert effective_steps(32, 1024, 1) == 32 and effective_steps(32, 10, 4) == 2
