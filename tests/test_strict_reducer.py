"""A part averaged without one of its senders must not pass for a complete average."""

from __future__ import annotations

import asyncio

import torch

from node.swarm.averager import _StrictPartReducer
from node.swarm.exact import decode_limb_average, encode_limbs


def _reduce(senders, failed=()):
    async def main():
        reducer = _StrictPartReducer([torch.Size([8])], num_senders=len(senders))
        for i in failed:
            reducer.on_sender_failed(i)
        tasks = [asyncio.create_task(reducer.accumulate_part(i, 0, t)) for i, t in enumerate(senders) if i not in failed]
        return (await asyncio.gather(*tasks))[0]

    return asyncio.run(main())


def test_a_complete_part_is_the_average_of_all_senders():
    a, b = encode_limbs(torch.arange(-4, 4))[:8], encode_limbs(torch.arange(8) * 3)[:8]
    out = _reduce([a, b])
    assert torch.equal(out, (a + b) / 2)
    # and its count bits say two peers contributed
    _, short = decode_limb_average(out.repeat(4), 2)
    assert short == 0


def test_a_part_missing_a_sender_is_poisoned_not_averaged():
    a, b = encode_limbs(torch.arange(8))[:8], encode_limbs(torch.arange(8) + 5)[:8]
    out = _reduce([a, b], failed=(1,))
    # hivemind's own reducer would return `a` here (the mean over what arrived), which decodes with a
    # correct-looking count for a group of two; the strict reducer makes it unmistakable
    assert torch.isnan(out).all()
