"""The English study corpus as a named corpus, and staged studies under a time limit."""

import json
import lzma
import tarfile
from pathlib import Path

import pytest

from structattn import lm_study, reproduce
from structattn import study as study_lib
from structattn.data import lm, text
from structattn.data.tokenizers import get_tokenizer


def _english_slice(folder, chars=3000):
  """A folder shaped like the English corpus: its 19 file names, each a few thousand
  characters of distinct text, xz-compressed, with a SHA256SUMS."""
  folder.mkdir(parents=True, exist_ok=True)
  sums = []
  for i, name in enumerate(text.ENGLISH_FILES):
    lines = [f"{name} line {j}: " + "abcdefghij"[i % 10] * (j % 40) for j in range(400)]
    body = ("\n".join(lines) + "\n")[:chars]
    path = folder / name
    path.write_bytes(lzma.compress(body.encode("ascii")))
    sums.append(f"{text._sha256(path)}  {name}")
  (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")
  return folder


def test_english_corpus_builds_and_splits_deterministically(tmp_path, no_network):
  src = _english_slice(tmp_path / "english")
  docs = {split: list(text.load_documents("english", split, val_fraction=0.05,
                                          data_dir=tmp_path / "a", corpus_dir=src).texts())
          for split in ("train", "validation")}
  assert len(docs["train"]) == len(docs["validation"]) == len(text.ENGLISH_FILES)
  for i, name in enumerate(text.ENGLISH_FILES):
    full = lzma.decompress((src / name).read_bytes()).decode()
    assert docs["train"][i] + docs["validation"][i] == full  # the tail of every source
    assert 0 < len(docs["validation"][i]) <= 0.05 * len(full) + 80
    assert docs["validation"][i].startswith(full[text.split_point(full, 0.05):][:20])
  again = list(text.load_documents("english", "validation", val_fraction=0.05,
                                   data_dir=tmp_path / "b", corpus_dir=src).texts())
  assert again == docs["validation"]
  tokens_N, stats = lm.split_tokens("english", "validation", get_tokenizer("char96"),
                                    val_fraction=0.05, data_dir=tmp_path / "a", corpus_dir=src)
  assert stats["num_documents"] == 19 and stats["num_replaced"] == 0
  assert len(tokens_N) == sum(len(d) + 1 for d in docs["validation"])


def test_english_corpus_errors_name_the_field(tmp_path, monkeypatch):
  monkeypatch.delenv(text.ENGLISH_DIR_ENV, raising=False)
  with pytest.raises(FileNotFoundError, match=r"data\.corpus='english' needs data\.corpus_dir"):
    text.find_corpus("english")
  src = _english_slice(tmp_path / "english")
  (src / "gcide.txt.xz").unlink()
  with pytest.raises(FileNotFoundError, match=r"data\.corpus_dir=.* lacks 1 of its 19 files: "
                     r"gcide\.txt\.xz"):
    text.find_corpus("english", src)
  src = _english_slice(tmp_path / "english2")
  (src / "milton.txt.xz").write_bytes(lzma.compress(b"edited\n"))
  with pytest.raises(ValueError, match=r"milton\.txt\.xz .* do not match its SHA256SUMS"):
    text.find_corpus("english", src)
  monkeypatch.setenv(text.ENGLISH_DIR_ENV, str(_english_slice(tmp_path / "english3")))
  assert [f.name for f in text.find_corpus("english")] == list(text.ENGLISH_FILES)


def test_pack_keeps_results_not_checkpoints_and_unpack_restores(tmp_path):
  runs = tmp_path / "runs"
  for name, status in (("a", "completed"), ("b", "failed: boom"), ("c", "running")):
    (runs / name / "checkpoints" / "7").mkdir(parents=True)
    (runs / name / "checkpoints" / "7" / "state").write_bytes(b"x" * 1000)
    (runs / name / "result.json").write_text(json.dumps({"status": status}))
    (runs / name / "config.json").write_text("{}")
    (runs / name / "metrics.jsonl").write_text('{"step": 1}\n')
  archive = tmp_path / "runs.tar.gz"
  assert study_lib.pack(runs, archive) == 2  # the running one is not finished
  with tarfile.open(archive) as tar:
    names = sorted(tar.getnames())
  assert names == ["a/config.json", "a/metrics.jsonl", "a/result.json",
                   "b/config.json", "b/metrics.jsonl", "b/result.json"]
  fresh = tmp_path / "fresh"
  assert study_lib.unpack(archive, fresh) == 2
  assert json.loads((fresh / "a" / "result.json").read_text())["status"] == "completed"
  assert not (fresh / "a" / "checkpoints").exists()
  (fresh / "a" / "metrics.jsonl").write_text("kept\n")
  study_lib.unpack(archive, fresh)  # a complete local run is not overwritten
  assert (fresh / "a" / "metrics.jsonl").read_text() == "kept\n"


def test_plan_stages_follow_the_grid(tmp_path):
  spec = lm_study.spec_for("mini")
  stages = lm_study.plan(spec, tmp_path)
  assert len(stages) == 1 and len(stages[0]) == len(spec.variants) * len(spec.lrs)
  for name, _ in stages[0]:  # finish the grid: the larger rate wins for mha, the smaller for mlr
    (tmp_path / name).mkdir()
    loss = 1.0 if ("mha" in name) == ("lr=0.01" in name) else 2.0
    (tmp_path / name / "result.json").write_text(
        json.dumps({"status": "completed", "final/eval_loss": loss}))
  assert lm_study.chosen_lrs(spec, tmp_path) == {"mha": 1e-2, "mlr": 3e-3}
  stages = lm_study.plan(spec, tmp_path)
  assert [len(s) for s in stages] == [4, 0, 2, 4]  # grid, middle widths, seeds, widest
  widest = {n: c for n, c in stages[3]}
  long = [c for c in widest.values() if c.train.steps == spec.long_steps]
  assert sorted((c.attention.variant, c.train.lr) for c in long) == [("mha", 1e-2), ("mlr", 3e-3)]
  assert all(c.model.d_model == spec.widths[-1] for c in widest.values())
  assert sorted(c.seed for _, c in stages[2]) == [1, 1]


def test_every_planned_point_has_a_valid_attention_spec(tmp_path):
  from structattn.attention import from_config
  for scale in reproduce.STUDY_SCALES:
    spec = lm_study.spec_for(scale)
    for v in spec.variants:  # every width, as the later stages plan them
      for w in spec.widths:
        _, c = lm_study.point(spec, v, w, spec.lrs[0], spec.steps)
        s = from_config(c.attention.to_dict(), d_model=c.model.d_model, seq_len=c.model.seq_len)
        assert s.d_model == w and c.attention.num_heads * spec.d_head == w


def test_edge_of_grid_extends_it(tmp_path):
  spec = lm_study.spec_for("english")
  names = [n for n, _ in lm_study.plan(spec, tmp_path)[0] if "variant=mha," in n]
  for n in names:  # the smallest rate wins: one more below it is planned
    (tmp_path / n).mkdir()
    (tmp_path / n / "result.json").write_text(json.dumps(
        {"status": "completed", "final/eval_loss": 1.0 if "lr=0.001," in n else 2.0}))
  mha = [c for _, c in lm_study.plan(spec, tmp_path)[0] if c.attention.variant == "mha"]
  assert sorted(c.train.lr for c in mha) == [0.000316, 0.001, 0.00316, 0.01]


def test_stale_runs_are_set_aside(tmp_path):
  spec = lm_study.spec_for("mini")
  name, config = lm_study.plan(spec, tmp_path)[0][0]
  (tmp_path / name).mkdir()
  ran = json.loads(json.dumps(config.to_dict()))
  ran["data"]["data_dir"] = "/elsewhere"  # a machine field: not stale
  (tmp_path / name / "config.json").write_text(json.dumps(ran))
  assert not study_lib.stale(tmp_path / name, config)
  ran["train"]["warmup_steps"] += 1
  (tmp_path / name / "config.json").write_text(json.dumps(ran))
  assert study_lib.stale(tmp_path / name, config)
  assert study_lib.set_aside_stale(tmp_path, [(name, config)], log=lambda s: None) == [name]
  assert (tmp_path / f"{name}.stale-1").is_dir() and not (tmp_path / name).exists()


def test_estimates_use_the_observed_rate():
  spec = lm_study.spec_for("mini")
  name, config = lm_study.plan(spec, Path("/nonexistent"))[0][0]
  key = study_lib.model_key(config)
  units = study_lib.units_of(config)
  assert study_lib.estimate_seconds([(name, config)], {(key, 1): units / 10.0},
                                    startup=5.0) == pytest.approx(15.0)
  slow = study_lib.estimate_seconds([(name, config)], {}, lm_study.flops_of, default_rate=1e3,
                                    startup=0.0)
  assert slow == pytest.approx(lm_study.flops_of(config) / 1e3)


@pytest.mark.slow
def test_mini_study_end_to_end_twice(tmp_path, capsys):
  work = tmp_path / "study"
  argv = ["lm-scaling", "--scale=mini", f"--workdir={work}"]
  assert reproduce.main(argv + ["--time-limit=4"]) == 0  # too short for any group
  first = json.loads((work / "summary.json").read_text())
  assert first["study"]["ran"] == [] and first["study"]["skipped_for_time"]
  assert reproduce.main(argv) == 0
  second = json.loads((work / "summary.json").read_text())
  assert second["study"]["pending"] == [] and len(second["study"]["ran"]) == 10
  assert set(second["points"].values()) == {"completed"}
  assert second["chosen_lr"].keys() == {"mha", "mlr"}
  assert (work / "runs.tar.gz").is_file() and (work / "frontier_analysis.md").is_file()
  assert reproduce.main(argv) == 0  # everything is done: nothing runs again
  third = json.loads((work / "summary.json").read_text())
  assert third["study"]["ran"] == []
  # A new machine with only the archive: every run restored, none repeated.
  elsewhere = tmp_path / "elsewhere"
  assert reproduce.main(["lm-scaling", "--scale=mini", f"--workdir={elsewhere}",
                         f"--archive={work / 'runs.tar.gz'}"]) == 0
  assert json.loads((elsewhere / "summary.json").read_text())["study"]["ran"] == []
  from structattn import fit_cli, results
  assert results.main([str(elsewhere / "runs"), f"--out={tmp_path / 'table'}"]) == 0
  assert (tmp_path / "table.csv").is_file()
  assert fit_cli.main([str(elsewhere / "runs"), f"--out={tmp_path / 'fit'}"]) == 0
  capsys.readouterr()


def _fake_finished(runs, name, config, tokens_per_s, flops_per_token):
  run = runs / name
  run.mkdir(parents=True)
  (run / "result.json").write_text(json.dumps({
      "status": "completed", "unit": "tokens", "compute/train_flops_per_token": flops_per_token}))
  rows = [{"step": s, "throughput/tokens_per_s": tokens_per_s} for s in (1, 2, 3)]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (run / "study.json").write_text(json.dumps({"group_size": 1}))


def test_unseen_models_are_estimated_at_the_largest_finished_models_rate(tmp_path):
  spec = lm_study.spec_for("mini")
  small = lm_study.point(spec, "mha", 32, 3e-3, 12)
  large = lm_study.point(spec, "mha", 64, 3e-3, 12)
  # The small model keeps the accelerator less busy (1e6 FLOP/s) than the large (4e6).
  _fake_finished(tmp_path, small[0], small[1], tokens_per_s=1e3, flops_per_token=1e3)
  _fake_finished(tmp_path, large[0], large[1], tokens_per_s=1e3, flops_per_token=4e3)
  rates = study_lib.observed_rates(tmp_path, [small, large])
  assert rates[("", 1)] == pytest.approx(4e6)
  unseen = lm_study.point(spec, "mlr", 64, 3e-3, 12)
  need = study_lib.estimate_seconds([unseen], rates, lm_study.flops_of, startup=0.0)
  assert need == pytest.approx(lm_study.flops_of(unseen[1]) / 4e6)


def test_only_keeps_the_matching_points_of_every_stage(tmp_path):
  spec = lm_study.spec_for("mini")
  plan = reproduce.study_plan(spec, only=["variant=mlr"])
  stages = plan(tmp_path)
  assert stages[0] and all("variant=mlr" in name for name, _ in stages[0])
  assert len(stages[0]) == len(spec.lrs)
  assert reproduce.study_plan(spec)(tmp_path)[0] == lm_study.plan(spec, tmp_path)[0]


def test_a_stage_out_of_time_does_not_stop_the_cheaper_next_stage(tmp_path):
  spec = lm_study.spec_for("mini")
  costly = lm_study.point(spec, "mha", 32, 3e-3, 12)
  cheap = lm_study.point(spec, "mha", 32, 1e-2, 4)
  flops = {costly[0]: 1e12, cheap[0]: 1.0}
  summary = study_lib.run_study(lambda runs: [[costly], [cheap]], tmp_path, time_limit=120,
                                flops_of=lambda c: flops[lm_study.point(
                                    spec, "mha", 32, c.train.lr, c.train.steps)[0]],
                                default_rate=1e6, startup=0.0, log=lambda s: None)
  assert summary["skipped_for_time"] == [costly[0]]
  assert summary["ran"] == [cheap[0]]
  assert summary["statuses"][cheap[0]] == "completed"


def test_rates_are_per_accelerator_across_sharing(tmp_path):
  spec = lm_study.spec_for("mini")
  name, config = lm_study.point(spec, "mha", 32, 3e-3, 12)
  _fake_finished(tmp_path, name, config, tokens_per_s=1e3, flops_per_token=1e3)
  (tmp_path / name / "study.json").write_text(json.dumps({"group_size": 1, "parallel": 2}))
  rates = study_lib.observed_rates(tmp_path, [(name, config)])
  key = study_lib.model_key(config)
  assert rates[(key, 1)] == pytest.approx(2e3)  # two groups shared the accelerator
  units = study_lib.units_of(config)
  alone = study_lib.estimate_seconds([(name, config)], rates, startup=0.0)
  shared = study_lib.estimate_seconds([(name, config)], rates, startup=0.0, parallel=4)
  assert alone == pytest.approx(units / 2e3) and shared == pytest.approx(4 * alone)


def test_widest_grid_is_the_chosen_rate_and_its_grid_neighbours(tmp_path):
  spec = lm_study.spec_for("english")
  for name, _ in lm_study.plan(spec, tmp_path)[0]:  # 1e-3 wins for every variant
    (tmp_path / name).mkdir()
    (tmp_path / name / "result.json").write_text(json.dumps(
        {"status": "completed", "final/eval_loss": 1.0 if "lr=0.001," in name else 2.0}))
  widest = lm_study.plan(spec, tmp_path)[3]
  mha = sorted((c.train.lr, c.train.steps) for _, c in widest if c.attention.variant == "mha")
  assert mha == [(0.000316, spec.steps), (0.001, spec.long_steps), (0.00316, spec.steps)]
  assert len(widest) == 3 * len(spec.variants)


def test_a_narrowed_plan_still_estimates_from_every_finished_run(tmp_path):
  spec = lm_study.spec_for("mini")
  large = lm_study.point(spec, "mha", 64, 3e-3, 12)
  _fake_finished(tmp_path, large[0], large[1], tokens_per_s=1e3, flops_per_token=4e3)
  (tmp_path / large[0] / "config.json").write_text(json.dumps(large[1].to_dict()))
  unseen = lm_study.point(spec, "mlr", 64, 3e-3, 12)
  rates = study_lib.observed_rates(tmp_path, study_lib.finished_points(tmp_path) + [unseen])
  need = study_lib.estimate_seconds([unseen], rates, lm_study.flops_of, startup=0.0)
  assert need == pytest.approx(lm_study.flops_of(unseen[1]) / 4e6)
