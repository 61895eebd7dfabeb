"""The official decode rules (tidesim.decode), hand-computed: the step cap, the per-step quota and
the absolute block layout, and one-line refusals naming the field."""

import math

import pytest

from tidesim.decode import check_decode, effective_steps, layout, transfer_schedule
from tidesim.errors import InputError


def test_step_cap_quota_and_layout_hand_computed() -> None:
    assert effective_steps(32, 1024) == 32                 # min(32, 1024 // 1)
    assert effective_steps(32, 10, minimal_topk=4) == 2    # min(32, 10 // 4)
    assert transfer_schedule(32, 5).tolist() == [7, 7, 6, 6, 6]    # 32 // 5 = 6, the first 32 % 5 = 2 get +1
    assert transfer_schedule(8, 16).tolist() == [1] * 8 + [0] * 8
    assert layout(20, 24, 16) == (1, 3)      # ceil(44 / 16) = 3 blocks; decoding starts at 20 // 16 = 1


def test_fields_are_named_in_refusals() -> None:
    with pytest.raises(InputError, match="^threshold must lie in"):
        check_decode(16, threshold=0.0)
    with pytest.raises(InputError, match="^--top-p must be a finite number"):
        check_decode(16, top_p=math.nan, flags=True)
