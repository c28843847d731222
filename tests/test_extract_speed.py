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
    monkeypatch.delenv("FASTFT_EXTRACT_AMP", raising=False)  # the suite pins 'auto' to fp32

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


def test_the_environment_says_what_auto_means(cpu_flags, monkeypatch):
    cpu_flags("avx512_bf16")
    monkeypatch.setenv("FASTFT_EXTRACT_AMP", "fp32")
    assert amp.resolve_amp("auto", "cpu") is None
    assert amp.resolve_amp("bf16", "cpu") == "bf16"  # an explicit choice is kept
    monkeypatch.setenv("FASTFT_EXTRACT_AMP", "fp8")
    with pytest.raises(FastFTValueError, match="FASTFT_EXTRACT_AMP must be"):
        amp.resolve_amp("auto", "cpu")
    monkeypatch.setenv("FASTFT_EXTRACT_AMP", "None")  # no environment value is Python's None
    with pytest.raises(FastFTValueError, match="must be 'fp32', 'bf16' or 'auto'") as err:
        amp.resolve_amp("auto", "cpu")
    assert "None or" not in str(err.value)


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


def tiny_bert():
    """A 2-layer BERT with random weights (seeded), in eval mode."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def test_a_masked_bert_gives_the_same_pooled_rows_on_trimmed_batches():
    bert = tiny_bert()
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


# ---------------------------------------------------------------------------- in a build
class MaskedEncoder(torch.nn.Module):
    """A tiny BERT as a prefix taking the tokenizer's dict; ``honour_mask=False`` attends to
    the padding (its rows then depend on how much padding there is)."""

    fastft_key_ignore = ("seen_lengths",)  # a record for the test, not what it computes

    def __init__(self, honour_mask=True, per_token=True):
        super().__init__()
        self.bert = tiny_bert()
        self.honour_mask, self.per_token = honour_mask, per_token
        self.seen_lengths = []

    def forward(self, x):
        self.seen_lengths.append(int(x["input_ids"].shape[1]))
        mask = x["attention_mask"] if self.honour_mask else None
        out = self.bert(input_ids=x["input_ids"], attention_mask=mask).last_hidden_state
        return out if self.per_token else out[:, 0]


def token_data(n=40, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, length + 1, (n,), generator=g)
    lens[5] = length  # one full-length sample
    mask = (torch.arange(length) < lens[:, None]).long()
    ids = torch.randint(1, 100, (n, length), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (n,), generator=g)


def dataset_order_rows(prefix, X, pool):
    with torch.no_grad():
        out = prefix(X)
    prefix.seen_lengths.clear()
    return lengths.per_sample(out, pool, X["attention_mask"])


def build(prefix, data, tmp_path, **kw):
    from fastft.cache import FeatureCache

    kw.setdefault("tier", "host")
    return FeatureCache.build(
        prefix, data, dtype="fp32", batch_size=8, cache_dir=tmp_path, progress=False, **kw
    )


@pytest.mark.parametrize("tier", ["host", "disk"])
@pytest.mark.parametrize("pool", ["masked_mean", "first"])
def test_length_sorted_build_holds_the_dataset_order_rows(tier, pool, tmp_path):
    prefix = MaskedEncoder()
    X, y = token_data()
    expected = dataset_order_rows(prefix, X, pool)
    cache = build(prefix, (X, y), tmp_path, pool=pool, tier=tier)
    (rows,) = cache.gather(torch.arange(len(y)))
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(cache.labels, y)
    # Longest first, every batch cut to its longest sample: lengths fall, and most batches
    # ran shorter than the padded 24 (before the first cut, the shortest samples are run
    # uncut and cut, once, to check).
    seen = prefix.seen_lengths
    assert seen[0] == 24 and min(seen) < 12
    assert seen[1:3] == [24, min(seen)]
    lens = X["attention_mask"].sum(1)
    order = torch.sort(lens, descending=True, stable=True).indices
    cut_runs = seen[3:]
    assert cut_runs == sorted(cut_runs, reverse=True) and max(cut_runs) < 24
    assert len(seen) == len(range(0, 40, 8)) + 2
    assert int(lens[order[:8]].max()) == 24
    assert "length-sorted" in cache.parts["numerics"]


def test_a_prefix_that_sees_the_padding_is_not_cut(tmp_path, caplog):
    prefix = MaskedEncoder(honour_mask=False)
    X, y = token_data()
    expected = dataset_order_rows(prefix, X, "masked_mean")
    with caplog.at_level("INFO", logger="fastft.cache"):
        cache = build(prefix, (X, y), tmp_path, pool="masked_mean")
    (rows,) = cache.gather(torch.arange(len(y)))
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-5)
    assert "length-aware batching off" in caplog.text
    assert prefix.seen_lengths.count(24) == len(prefix.seen_lengths) - 1  # the one check ran cut


def test_per_token_taps_kept_whole_are_never_cut(tmp_path):
    prefix = MaskedEncoder()
    X, y = token_data(n=16)
    with torch.no_grad():
        expected = prefix(X).flatten(1)
    prefix.seen_lengths.clear()
    cache = build(prefix, (X, y), tmp_path, pool="none")
    (rows,) = cache.gather(torch.arange(len(y)))
    torch.testing.assert_close(rows.flatten(1), expected, rtol=1e-4, atol=1e-5)
    assert rows.shape[1] == 24 * 32 and cache.taps[0].shape == (24, 32)


def test_unpadded_or_transformed_data_keep_the_dataset_order(tmp_path):
    prefix = MaskedEncoder(per_token=False)
    X, y = token_data(n=16)
    full = {k: torch.ones_like(v) if k == "attention_mask" else v for k, v in X.items()}
    cache = build(prefix, (full, y), tmp_path, pool="first")
    assert "length-sorted" not in cache.parts["numerics"]
    assert prefix.seen_lengths == [24, 24]
    assert lengths.visit_order(object(), "attention_mask", 1, None) is None


def test_length_sorted_build_resumes_in_the_same_order(tmp_path, monkeypatch):
    """An interrupted disk build resumes the chunks it had not written, in the same visit
    order, and ends holding the dataset-order rows."""
    from fastft.cache import writer as writer_module

    prefix = MaskedEncoder()
    X, y = token_data()
    expected = dataset_order_rows(prefix, X, "masked_mean")
    real_write, calls = writer_module.Writer.write, []

    def dying_write(self, chunk, *args):
        calls.append(chunk.start)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(self, chunk, *args)

    monkeypatch.setattr(writer_module.Writer, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        build(prefix, (X, y), tmp_path, pool="masked_mean", tier="disk")
    monkeypatch.setattr(writer_module.Writer, "write", real_write)
    prefix.seen_lengths.clear()
    cache = build(prefix, (X, y), tmp_path, pool="masked_mean", tier="disk")
    assert cache.telemetry["hit"] is False
    (rows,) = cache.gather(torch.arange(len(y)))
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-5)
    assert len(prefix.seen_lengths) < 6  # the committed chunks were not run again


@pytest.mark.parametrize("native", [True, False])
def test_finetuner_default_is_bf16_only_where_native(native, cpu_flags, tmp_path):
    import fastft

    cpu_flags(*(("avx512_bf16",) if native else ("avx512f",)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    X, y = torch.randn(64, 16), torch.randint(0, 3, (64,))
    ft = fastft.FineTuner(model, num_classes=3, cache="host", cache_dtype="fp32", verbose=False)
    assert ft.extract_amp == "auto"
    cache = ft.build_cache((X, y))
    assert ("bf16 autocast" in cache.parts["dtype"]) == native
    (rows,) = cache.gather(torch.arange(64))
    with torch.no_grad():
        out = ft.prefix.eval()(X)
    exact = out[0] if isinstance(out, tuple) else out  # the prefix returns its taps
    error = float((rows - exact).abs().max() / exact.abs().max())
    assert (error > 1e-6) == native and error < 2e-2  # bf16 rounding, or none at all


# ---------------------------------------------------------------------------- several processes
class MaskedMeanEmbedding(torch.nn.Module):
    """Embeddings averaged over the real tokens: honours the mask, so batches are cut."""

    fastft_key_ignore = ("seen_lengths",)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(100, 16)
        self.mix = torch.nn.Linear(16, 16)
        self.seen_lengths = []

    def forward(self, x):
        self.seen_lengths.append(int(x["input_ids"].shape[1]))
        mask = x["attention_mask"].unsqueeze(-1).float()
        pooled = (self.embed(x["input_ids"]) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return torch.tanh(self.mix(pooled))


def _sharded_rank(rank, init, cache_dir, out):
    import torch.distributed as dist

    from helpers.spawned import exit_without_finalizing

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        prefix = MaskedMeanEmbedding()
        cache = build(prefix, token_data(n=70), cache_dir, tier="disk")
        (rows,) = cache.gather(torch.arange(70))
        seen = prefix.seen_lengths
        torch.save({"rows": rows, "fp": cache.fingerprint, "seen": seen}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
    exit_without_finalizing()


def test_a_sharded_build_visits_by_length_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(
        _sharded_rank,
        args=(str(tmp_path / "init"), str(tmp_path / "shared"), str(tmp_path / "rows")),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    ranks = [torch.load(tmp_path / f"rows.{r}") for r in range(2)]
    X, _ = token_data(n=70)
    with torch.no_grad():
        expected = MaskedMeanEmbedding()(X)
    assert ranks[0]["fp"] == ranks[1]["fp"]
    for r in ranks:
        torch.testing.assert_close(r["rows"], expected, rtol=1e-5, atol=1e-6)
    # every rank cut its batches to their longest sample, not only visited them by length
    assert all(min(r["seen"]) < 12 for r in ranks), [r["seen"] for r in ranks]
    single = build(MaskedMeanEmbedding(), token_data(n=70), tmp_path / "single", tier="disk")
    assert single.fingerprint == ranks[0]["fp"] and "length-sorted" in single.parts["numerics"]


class PaddingMean(torch.nn.Module):
    """Sees the padding only a little: the mean of every position's token id, pads included.
    On a large offset, cutting one pad of 128 moves it by 2e-5 of its size (within rounding
    even in fp32); cutting 120 moves it a hundred times more."""

    def forward(self, x):
        return x["input_ids"].float().mean(1, keepdim=True).expand(-1, 4) + 1000.0


@pytest.mark.parametrize("amp_mode", [None, "bf16"])
def test_a_prefix_barely_changed_by_the_first_cut_is_still_not_cut(amp_mode, tmp_path, cpu_flags):
    """The first cut batch (longest first) loses one pad; the check must still see that the
    shortest samples, cut by far more, would get other rows than the dataset-order pass."""
    cpu_flags("avx512_bf16")
    n, length = 32, 128
    lens = torch.full((n,), 8)
    lens[:8], lens[8:16] = 128, 127
    mask = (torch.arange(length) < lens[:, None]).long()
    X = {"input_ids": torch.full((n, length), 3) * mask, "attention_mask": mask}
    y = torch.zeros(n, dtype=torch.long)
    expected = PaddingMean()(X)
    cache = build(PaddingMean(), (X, y), tmp_path, pool="first", amp=amp_mode)
    (rows,) = cache.gather(torch.arange(n))
    torch.testing.assert_close(rows - 1000, expected - 1000, rtol=0, atol=1e-3)


class WithFeatures(torch.nn.Module):
    """Takes, beside the tokens, a per-sample feature vector as long as the padded sequence."""

    def __init__(self, length):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.proj = torch.nn.Embedding(100, 8), torch.nn.Linear(length, 8)

    def forward(self, x):
        m = x["attention_mask"].unsqueeze(-1).float()
        tokens = (self.emb(x["input_ids"]) * m).sum(1) / m.sum(1)
        return tokens + self.proj(x["features"])


def test_a_non_token_tensor_as_long_as_the_mask_keeps_the_build_working(tmp_path):
    """Cutting every [N, L] tensor also cuts one that only happens to have L columns: the model
    then fails on the cut batch; the build must keep the full length, not fail."""
    X, y = token_data(n=16, length=24)
    X["features"] = torch.randn(16, 24)
    prefix = WithFeatures(24)
    with torch.no_grad():
        expected = prefix(X)
    cache = build(prefix, (X, y), tmp_path, pool="first")
    (rows,) = cache.gather(torch.arange(16))
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-5)


def test_a_rebuild_for_another_extract_amp_says_so(tmp_path, cpu_flags):
    cpu_flags("avx512_bf16")
    prefix = torch.nn.Sequential(torch.nn.Linear(8, 4))
    data = (torch.randn(16, 8), torch.zeros(16, dtype=torch.long))
    build(prefix, data, tmp_path, amp="bf16", tier="disk")
    cache = build(prefix, data, tmp_path, amp=None, tier="disk")
    assert "extract_amp" in cache.telemetry["reason"]


def test_cache_info_says_which_precision_the_pass_ran_in(tmp_path, cpu_flags, capsys):
    from fastft.cli import main

    cpu_flags("avx512_bf16")
    prefix = torch.nn.Sequential(torch.nn.Linear(8, 4))
    data = (torch.randn(16, 8), torch.zeros(16, dtype=torch.long))
    for amp_mode, words in (("bf16", "bf16 autocast"), (None, "fp32")):
        cache = build(prefix, data, tmp_path, amp=amp_mode, tier="disk")
        capsys.readouterr()
        main(["cache", "info", cache.fingerprint, "--cache-dir", str(tmp_path)])
        assert f"frozen pass: {words}\n" in capsys.readouterr().out


def test_finetuner_refuses_emulated_bf16_at_construction_by_its_own_name(cpu_flags):
    """fit(amp=) is the training autocast: the refusal must name extract_amp, and come when
    the FineTuner is made, not at the first fit."""
    import fastft

    cpu_flags("avx512f")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(FastFTValueError, match=r"extract_amp='bf16' on cpu.*Leave extract_amp"):
        fastft.FineTuner(model, num_classes=2, extract_amp="bf16", device="cpu")


def test_a_cache_of_another_model_and_data_is_new_not_rebuilt(tmp_path):
    """The cache folder holds a cache of another model on other data: nothing was rebuilt."""
    torch.manual_seed(0)
    build(
        torch.nn.Sequential(torch.nn.Linear(8, 4)),
        (torch.randn(16, 8), torch.zeros(16)),
        tmp_path,
        tier="disk",
    )
    other = torch.nn.Sequential(torch.nn.Linear(8, 4))
    cache = build(other, (torch.randn(16, 8), torch.zeros(16)), tmp_path, tier="disk")
    assert cache.telemetry["reason"].startswith("new: "), cache.telemetry["reason"]


def test_a_resume_on_features_of_another_precision_is_refused(cpu_flags, tmp_path):
    import fastft

    cpu_flags("avx512_bf16")  # 'auto' is bf16 here
    X, y = torch.randn(96, 16), torch.randint(0, 3, (96,))
    ckpt = str(tmp_path / "run.ckpt")

    def tuner(extract_amp):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
        )
        return fastft.FineTuner(
            model, num_classes=3, cache="host", extract_amp=extract_amp, verbose=False
        )

    tuner("auto").fit((X, y), epochs=2, checkpoint=ckpt)
    with pytest.raises(
        FastFTValueError, match=r"bf16 frozen pass.*runs in fp32.*extract_amp='bf16'"
    ):
        tuner(None).fit((X, y), epochs=4, checkpoint=ckpt, resume=True)
    resumed = tuner("bf16").fit((X, y), epochs=4, checkpoint=ckpt, resume=True)  # the same pass
    assert [r["epoch"] for r in resumed][-2:] == [3, 4]
