import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open

from linearize.config import DataConfig
from linearize.convert.teachers import load_teacher
from linearize.data import build_splits
from linearize.distill import logit_cache
from linearize.distill.logit_cache import LogitCache, LogitCacheError, kl_from_topk, write_logit_cache
from linearize.distill.losses import kl_teacher_student

BLOCKS = 10  # with SHARD = 4: three shards, the last one short
SHARD = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards: with OpenMP's active wait on a loaded 2-core machine two threads run them ~30x slower
    than one (see PITFALLS, CPU timing)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher_and_blocks():
    teacher, tok = load_teacher("bundled:stories260K")
    return teacher, build_splits(DataConfig(seq_len=32), tok).train[:BLOCKS]


@pytest.fixture(scope="module")
def cache_dir(teacher_and_blocks, tmp_path_factory):
    teacher, blocks = teacher_and_blocks
    folder = tmp_path_factory.mktemp("cache") / "k16"
    write_logit_cache(teacher, blocks, folder, k=16, shard_blocks=SHARD, batch_size=3)
    return folder


def teacher_logits(teacher, blocks):
    with torch.no_grad():
        return teacher(input_ids=blocks, use_cache=False).logits.float()


def test_cache_round_trips(teacher_and_blocks, cache_dir):
    teacher, blocks = teacher_and_blocks
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert (manifest["k"], manifest["vocab_size"], manifest["seq_len"], manifest["num_blocks"]) == (
        16,
        512,
        32,
        10,
    )
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 4), (4, 8), (8, 10)]
    assert sorted(p.name for p in cache_dir.iterdir()) == ["manifest.json"] + [
        s["file"] for s in manifest["shards"]
    ]
    with safe_open(cache_dir / "shard-00002.safetensors", framework="pt") as f:
        dtypes = {name: f.get_tensor(name).dtype for name in f.keys()}
    assert dtypes == {
        "logprobs": torch.float16,
        "indices": torch.int16,
        "lse": torch.float32,
        "block_hash": torch.int64,
    }

    ids = [9, 0, 5, 5, 3]  # across shards, out of order, repeated
    got = LogitCache(cache_dir).fetch(ids, blocks[ids])
    logits = teacher_logits(teacher, blocks[ids])
    top = logits.topk(16, dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    assert torch.equal(got.indices, top.indices)
    torch.testing.assert_close(got.lse, lse)
    # the stored log-probs are float16: relative error <= 2**-11
    logp = top.values - lse.unsqueeze(-1)
    assert ((got.values - top.values).abs() <= logp.abs() * 2**-11 + 1e-5).all()


def test_full_vocab_kl_equals_kl_teacher_student():
    gen = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(2, 7, 50, generator=gen)
    student = (3 * torch.randn(2, 7, 50, generator=gen)).requires_grad_()
    perm = torch.randperm(50, generator=gen)  # the order of the k entries does not matter
    values, indices = teacher[..., perm], perm.expand(2, 7, 50)
    cached = kl_from_topk(student, values, indices, torch.logsumexp(teacher, -1))
    (g_cached,) = torch.autograd.grad(cached, student)
    full = kl_teacher_student(student, teacher)
    (g_full,) = torch.autograd.grad(full, student)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_cached, g_full, atol=1e-6, rtol=1e-5)


def test_topk_kl_is_close_to_full_kl_and_pulls_the_right_way(teacher_and_blocks):
    teacher, blocks = teacher_and_blocks
    t_logits = teacher_logits(teacher, blocks[:4])
    top = t_logits.topk(32, dim=-1)
    lse = torch.logsumexp(t_logits, dim=-1)

    assert kl_from_topk(t_logits, top.values, top.indices, lse).abs().item() < 1e-6
    student = (
        t_logits + torch.randn(t_logits.shape, generator=torch.Generator().manual_seed(0))
    ).requires_grad_()
    cached = kl_from_topk(student, top.values, top.indices, lse)
    full = kl_teacher_student(student, t_logits)
    assert cached.item() <= full.item() + 1e-6  # coarsening to k + 1 buckets can only lose divergence
    assert cached.item() > 0.8 * full.item()

    (g_cached,) = torch.autograd.grad(cached, student)
    (g_full,) = torch.autograd.grad(full, student)
    assert torch.isfinite(g_cached).all()
    assert torch.nn.functional.cosine_similarity(g_cached.flatten(), g_full.flatten(), dim=0) > 0.9
    with torch.no_grad():  # a gradient step on the cache loss lowers the full KL
        assert kl_teacher_student(student - 100 * g_cached, t_logits) < full


def test_kl_argument_errors():
    logits, idx, lse = torch.randn(2, 3, 10), torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="temperature 1.0 only, got 2.0.*stages.logits.temperature=1.0"):
        kl_from_topk(logits, torch.zeros(2, 3, 4), idx, lse, temperature=2.0)
    with pytest.raises(ValueError, match="same leading shape"):
        kl_from_topk(logits, torch.zeros(2, 3, 4), idx, lse[:, :2])


def test_resume_after_a_kill_equals_an_uninterrupted_write(
    teacher_and_blocks, cache_dir, tmp_path, monkeypatch
):
    teacher, blocks = teacher_and_blocks
    real_save, calls = logit_cache.save_file, []

    def killed_on_third_shard(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            path.write_bytes(b"half a shard")  # the kill leaves a partial temp file
            raise KeyboardInterrupt
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(logit_cache, "save_file", killed_on_third_shard)
    folder = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        write_logit_cache(teacher, blocks, folder, k=16, shard_blocks=SHARD, batch_size=3)
    assert sorted(p.name for p in folder.iterdir()) == [
        ".tmp-shard-00002.safetensors",
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    with pytest.raises(LogitCacheError, match="incomplete.*shard-00002.*rerun write_logit_cache"):
        LogitCache(folder)

    calls.clear()
    monkeypatch.setattr(
        logit_cache, "save_file", lambda t, p, metadata=None: calls.append(p) or real_save(t, p, metadata)
    )
    write_logit_cache(teacher, blocks, folder, k=16, shard_blocks=SHARD, batch_size=3)
    assert [p.name for p in calls] == [".tmp-shard-00002.safetensors"]  # only the missing shard
    names = sorted(p.name for p in cache_dir.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == names  # the temp file is gone
    assert [n for n in names if (folder / n).read_bytes() != (cache_dir / n).read_bytes()] == []


def test_a_cache_for_another_request_is_refused(teacher_and_blocks, cache_dir):
    teacher, blocks = teacher_and_blocks
    with pytest.raises(
        LogitCacheError, match=r"k is 16 in the cache, 8 requested; delete .*k16 .*another folder"
    ):
        write_logit_cache(teacher, blocks, cache_dir, k=8, shard_blocks=SHARD)
    with pytest.raises(LogitCacheError, match="num_blocks is 10 in the cache, 9 requested"):
        write_logit_cache(teacher, blocks[:9], cache_dir, k=16, shard_blocks=SHARD)
    shuffled = blocks[[0, 1, 2, 3, 5, 4, 6, 7, 8, 9]]
    with pytest.raises(
        LogitCacheError, match=r"blocks 4..7 \(shard-00001.safetensors\) hold other token ids"
    ):
        write_logit_cache(teacher, shuffled, cache_dir, k=16, shard_blocks=SHARD)
    with pytest.raises(LogitCacheError, match="built from another teacher.*stories260K"):
        write_logit_cache(tiny_model("qwen3"), blocks, cache_dir, k=16, shard_blocks=SHARD)


def test_a_shard_of_other_blocks_is_refused(teacher_and_blocks, cache_dir, tmp_path):
    teacher, blocks = teacher_and_blocks
    folder = shutil.copytree(cache_dir, tmp_path / "cache")
    shutil.copy(folder / "shard-00000.safetensors", folder / "shard-00001.safetensors")
    with pytest.raises(
        LogitCacheError, match="shard-00001.safetensors holds other blocks than its manifest entry"
    ):
        write_logit_cache(teacher, blocks, folder, k=16, shard_blocks=SHARD)
    with pytest.raises(LogitCacheError, match="block 5: its token ids differ"):
        LogitCache(folder).fetch([5], blocks[[5]])


def test_same_config_other_weights_is_refused(teacher_and_blocks, tmp_path):
    _, blocks = teacher_and_blocks
    write_logit_cache(tiny_model("llama", seed=0), blocks[:2], tmp_path / "c", k=4, shard_blocks=1)
    write_logit_cache(
        tiny_model("llama", seed=0), blocks[:2], tmp_path / "c", k=4, shard_blocks=1
    )  # same: fine
    with pytest.raises(
        LogitCacheError, match="differ from the stored ones.*other weights with the same config"
    ):
        write_logit_cache(tiny_model("llama", seed=1), blocks[:2], tmp_path / "c", k=4, shard_blocks=1)


def test_a_folder_that_is_not_a_cache_is_refused(teacher_and_blocks, tmp_path):
    teacher, blocks = teacher_and_blocks
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LogitCacheError, match="not empty and holds no logit cache"):
        write_logit_cache(teacher, blocks, tmp_path, k=4)
    with pytest.raises(LogitCacheError, match="holds no logit cache"):
        LogitCache(tmp_path)


def test_reading_with_other_token_ids_names_the_block(teacher_and_blocks, cache_dir):
    _, blocks = teacher_and_blocks
    cache = LogitCache(cache_dir)
    with pytest.raises(LogitCacheError, match="block 6: its token ids differ"):
        cache.fetch([2, 6], blocks[[2, 7]])
    with pytest.raises(IndexError, match="block 10 is out of range: the cache holds 10 blocks"):
        cache.fetch([10], blocks[:1])


def test_lookup_finds_blocks_by_their_tokens(teacher_and_blocks, cache_dir):
    _, blocks = teacher_and_blocks
    cache = LogitCache(cache_dir)
    by_tokens = cache.lookup(blocks[[7, 2]])
    by_index = cache.fetch([7, 2], blocks[[7, 2]])
    assert torch.equal(by_tokens.values, by_index.values) and torch.equal(by_tokens.indices, by_index.indices)
    with pytest.raises(LogitCacheError, match="holds no block with these token ids"):
        cache.lookup(blocks[:1].flip(-1))


def test_logits_stage_from_a_full_cache_matches_the_live_teacher(teacher_and_blocks, tmp_path):
    """k = vocab: the cached stage-2 loss and its gradients are the live frozen teacher's (float16 log-probs)."""
    import copy

    from linearize.config import LogitsStageConfig, StudentConfig
    from linearize.convert.swap import plan_for, swap
    from linearize.distill.stages import logits_stage
    from linearize.distill.teacher import CachedTeacher, LiveTeacher

    teacher, blocks = teacher_and_blocks
    teacher = copy.deepcopy(teacher)
    cache = write_logit_cache(teacher, blocks[:4], tmp_path / "full", k=512)
    frozen = copy.deepcopy(teacher)
    student = swap(teacher, plan_for(StudentConfig(), teacher.config))
    cfg = LogitsStageConfig(trainable="attention")
    losses, grads = [], []
    for source in (LiveTeacher(frozen), CachedTeacher(cache)):
        model, loss_fn = logits_stage(student, cfg, source)
        loss = loss_fn(model, blocks[:4])
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        model.zero_grad(set_to_none=True)
    assert losses[0] > 0.5 and abs(losses[0] - losses[1]) <= 1e-3 * losses[0]
    assert (grads[0] - grads[1]).norm() <= 1e-2 * grads[0].norm()


def test_convert_with_a_logit_cache_writes_it_once_and_needs_no_teacher_copy(tmp_path, capsys):
    from linearize.config import RecipeError, load_recipe
    from linearize.pipeline import convert

    overrides = {
        "output_dir": str(tmp_path / "run"),
        "stages.attention.steps": "2",
        "stages.logits.steps": "3",
        "stages.logits.cache_k": "16",
        "stages.logits.trainable": "attention",
        "data.heldout_docs": "4",
        "eval.tasks": "[]",
    }
    convert(load_recipe("tiny", overrides))
    folder = tmp_path / "run" / "logit_cache"
    assert json.loads((folder / "manifest.json").read_text())["k"] == 16
    assert "teacher top-16 logit cache" in capsys.readouterr().out
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    shutil.rmtree(
        tmp_path / "run" / "logits"
    )  # stage 2 again: the cache is checked and reused, not rewritten
    convert(load_recipe("tiny", overrides))
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    with pytest.raises(RecipeError, match="cache_k needs stages.logits.temperature=1"):
        load_recipe("tiny", {**overrides, "stages.logits.temperature": "2"})


def run_two_ranks(write, barrier) -> None:
    """`write(rank)` on two threads named rank0 and rank1 (two processes, sharing `barrier`); an error in
    either is raised here, after aborting the barrier so the other thread does not wait forever."""
    import threading

    errors = []

    def rank(r: int) -> None:
        try:
            write(r)
        except Exception as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def assert_same_cache(folder: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == names
    for name in names:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name


def test_processes_write_their_share_of_the_shards_into_the_same_files(
    teacher_and_blocks, cache_dir, tmp_path, monkeypatch
):
    """Two processes (threads here, with a real barrier): rank 0 writes the manifest and shards 0 and 2,
    rank 1 shard 1, each with its own teacher; the folder is byte-identical to the one-process cache, and a
    rerun on two processes keeps it (each checks its own shards, none recomputes one)."""
    import threading

    teacher, blocks = teacher_and_blocks
    folder = tmp_path / "two"
    barrier = threading.Barrier(2, timeout=120)
    computed: dict[str, list[int]] = {"rank0": [], "rank1": []}
    topk = logit_cache._teacher_topk

    def recording_topk(teacher, part, *args):
        computed[threading.current_thread().name].append(len(part))
        return topk(teacher, part, *args)

    monkeypatch.setattr(logit_cache, "_teacher_topk", recording_topk)

    def write(r: int) -> None:
        write_logit_cache(
            teacher, blocks, folder, k=16, shard_blocks=SHARD, batch_size=3,
            rank=r, world_size=2, barrier=barrier.wait,
        )  # fmt: skip

    for round_ in range(2):  # the second round finds a complete cache
        run_two_ranks(write, barrier)
        # shards of 4, 4 and 2 blocks: rank 0 wrote the first and the last, rank 1 the middle one
        assert computed == ({"rank0": [4, 2], "rank1": [4]} if round_ == 0 else {"rank0": [], "rank1": []})
        assert_same_cache(folder, cache_dir)
        computed = {"rank0": [], "rank1": []}


def test_a_sharded_teacher_runs_as_many_forwards_on_every_process(teacher_and_blocks, cache_dir, tmp_path):
    """A teacher sharded over the processes (FSDP2) has a collective forward, so with `max_over_processes`
    every process runs as many forwards as the busiest one, the extra ones on two tokens: on a fresh cache
    (rank 0: shards of 4 and 2 blocks, 3 forwards of batch 3; rank 1: one shard of 4, 2 forwards) and on a
    resumed one (rank 0: its probe and one shard; rank 1: only its probe). No forward runs before the
    processes agree on the count (it would meet another process's all-reduce). The files are the one-process
    ones."""
    import threading

    teacher, blocks = teacher_and_blocks
    folder = tmp_path / "sharded"
    barrier = threading.Barrier(2, timeout=120)
    counts: dict[int, int] = {}

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config, self.forwards, self.agreed = teacher, teacher.config, 0, False

        def forward(self, **kwargs):
            assert self.agreed, "a forward before the processes agreed on their number"
            self.forwards += 1
            return self.inner(**kwargs)

    def max_over(model):
        def most(n: int) -> int:
            counts[model.rank] = n
            barrier.wait()
            top = max(counts.values())
            barrier.wait()
            model.agreed = True
            return top

        return most

    for round_ in range(2):
        models = [Counting().eval(), Counting().eval()]
        for r, model in enumerate(models):
            model.rank = r

        def write(r: int, models=models) -> None:
            write_logit_cache(
                models[r], blocks, folder, k=16, shard_blocks=SHARD, batch_size=3, teacher_name=None,
                rank=r, world_size=2, barrier=barrier.wait, max_over_processes=max_over(models[r]),
            )  # fmt: skip

        run_two_ranks(write, barrier)
        assert counts == ({0: 3, 1: 2} if round_ == 0 else {0: 3, 1: 1})  # what each process needed
        assert [m.forwards for m in models] == [3, 3]  # what each ran
        assert_same_cache(folder, cache_dir)
        (folder / "shard-00000.safetensors").unlink()  # rank 0's: the rerun probes, then writes it again
