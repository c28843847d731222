"""The cheaper frozen pass: bf16 extraction where the device computes bf16 natively, and
length-aware batching of padded token sequences (fastft.cache.amp, fastft.cache.lengths)."""

from __future__ import annotations

import pytest
import torch

from fastft.cache import amp, lengths
from fastft.errors import FastFTValueError


# ---------------------------------------------------------------------------- extract_amp
@pytest.fixture
def cpu_flags(monkeypatch):
    def set_flags(*flags):
        monkeypatch.setattr(amp, "_cpu_flags", lambda: frozenset(flags))

    return set_flags


@pytest.mark.parametrize("off", [None, "fp32"])
def test_fp32_choices_never_autocast(off, cpu_flags):
    cpu_flags("avx512_bf16")
    assert amp.resolve_amp(off, "cpu") is None


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(("avx512_bf16",), "bf16"), (("amx_bf16", "amx_tile"), "bf16"), (("avx512f", "avx2"), None)],
)
def test_auto_is_bf16_only_where_native(flags, expected, cpu_flags):
    cpu_flags(*flags)
    assert amp.resolve_amp("auto", "cpu") == expected


def test_explicit_bf16_where_emulated_is_refused_with_the_way_out(cpu_flags):
    cpu_flags("avx512f", "avx512bw")  # AVX512 without BF16: torch's mkldnn check says yes
    with pytest.raises(FastFTValueError, match=r"emulated.*'auto'.*None for fp32"):
        amp.resolve_amp("bf16", "cpu")


def test_explicit_bf16_where_native_is_kept(cpu_flags):
    cpu_flags("avx512_bf16")
    assert amp.resolve_amp("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("bad", ["fp16", "BF16", True, "float32"])
def test_unknown_extract_amp_is_refused(bad):
    with pytest.raises(FastFTValueError, match="extract_amp must be"):
        amp.resolve_amp(bad, "cpu")


def test_cpu_flags_are_read_from_the_kernel():
    flags = amp._cpu_flags()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    line = next(
        (x for x in text.splitlines() if x.split(":")[0].strip() in ("flags", "Features")), ""
    )
    assert flags == frozenset(line.partition(":")[2].split())
    native, why = amp.native_bf16("cpu")
    assert native == bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    assert ("emulated" in why) != native


# ---------------------------------------------------------------------------- lengths
def padded(lens, length=8, left=False):
    mask = torch.zeros(len(lens), length, dtype=torch.long)
    for i, n in enumerate(lens):
        if left:
            mask[i, length - n :] = 1
        else:
            mask[i, :n] = 1
    ids = torch.randint(1, 100, (len(lens), length)) * mask
    return {"input_ids": ids, "attention_mask": mask}


def test_sequence_lengths_read_the_last_real_token():
    inputs = padded([3, 8, 1, 5])
    inputs["attention_mask"][0, 1] = 0  # a hole inside: the length is still to the last one
    assert lengths.sequence_lengths(inputs, "attention_mask").tolist() == [3, 8, 1, 5]


def test_left_padding_gives_full_lengths_so_nothing_is_cut():
    inputs = padded([3, 8, 1], left=True)
    assert lengths.sequence_lengths(inputs, "attention_mask").tolist() == [8, 8, 8]
    assert lengths.trim(inputs, "attention_mask") is inputs


@pytest.mark.parametrize(
    "inputs",
    [
        torch.zeros(4, 8),
        {"input_ids": torch.zeros(4, 8, dtype=torch.long)},  # no mask
        {"attention_mask": torch.ones(4, 8), "extra": torch.zeros(4)},  # a per-sample entry
        {"attention_mask": torch.ones(4, 8, 2)},
    ],
)
def test_inputs_without_a_plain_token_mask_are_not_length_sorted(inputs):
    assert lengths.sequence_lengths(inputs, "attention_mask") is None


def test_length_order_is_longest_first_and_stable():
    order = lengths.length_order(torch.tensor([3, 8, 3, 1, 8]))
    assert order.tolist() == [1, 4, 0, 2, 3]


def test_trim_cuts_every_per_token_tensor_to_the_batch_longest():
    inputs = padded([3, 5, 2])
    inputs["token_type_ids"] = torch.zeros(3, 8, dtype=torch.long)
    inputs["image"] = torch.zeros(3, 4, 4)  # second axis not the mask's length: untouched
    cut = lengths.trim(inputs, "attention_mask")
    assert cut["input_ids"].shape == (3, 5) and cut["token_type_ids"].shape == (3, 5)
    assert torch.equal(cut["input_ids"], inputs["input_ids"][:, :5])
    assert cut["image"] is inputs["image"]


def test_per_sample_refuses_taps_that_see_the_padding():
    mask = padded([3, 5])["attention_mask"]
    x = torch.randn(2, 8, 4)
    assert lengths.per_sample(x, "none", mask) is None
    assert lengths.per_sample(x, "mean", mask) is None
    assert lengths.per_sample(x, "max", mask) is None
    assert torch.equal(lengths.per_sample(x, "first", mask), x[:, 0])
    expected = torch.stack([x[0, :3].mean(0), x[1, :5].mean(0)])
    assert torch.allclose(lengths.per_sample(x, "masked_mean", mask), expected, atol=1e-6)


def test_same_outputs_tolerates_rounding_only():
    a = [torch.randn(4, 16)]
    assert lengths.same_outputs(a, [a[0] * (1 + 1e-6)], bf16=False)
    assert not lengths.same_outputs(a, [a[0] + 0.05 * a[0].abs().amax()], bf16=False)
    assert lengths.same_outputs(a, [a[0].bfloat16().float()], bf16=True)
    assert not lengths.same_outputs(a, [a[0][:, :8]], bf16=False)
    assert not lengths.same_outputs([torch.full((2, 2), float("nan"))], [torch.zeros(2, 2)], False)


def test_a_masked_bert_gives_the_same_pooled_rows_on_trimmed_batches():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    inputs = padded([3, 5, 2, 4])
    cut = lengths.trim(inputs, "attention_mask")
    assert cut["input_ids"].shape[1] == 5
    with torch.no_grad():
        full = bert(**inputs).last_hidden_state
        short = bert(**cut).last_hidden_state
    for pool in ("first", "masked_mean"):
        a = lengths.per_sample(full, pool, inputs["attention_mask"])
        b = lengths.per_sample(short, pool, cut["attention_mask"])
        assert lengths.same_outputs([a], [b], bf16=False), pool
    # Without the mask the model attends to the padding: trimming changes the rows.
    with torch.no_grad():
        blind_full = bert(input_ids=inputs["input_ids"]).last_hidden_state
        blind_short = bert(input_ids=cut["input_ids"]).last_hidden_state
    a = lengths.per_sample(blind_full, "masked_mean", inputs["attention_mask"])
    b = lengths.per_sample(blind_short, "masked_mean", cut["attention_mask"])
    assert not lengths.same_outputs([a], [b], bf16=False)
