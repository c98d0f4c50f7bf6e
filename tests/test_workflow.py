"""The user's workflow on the Ray-free path: train (with validation) -> export -> eval -> generate -> train from HF."""

import json

import pytest

from cluster.cli import main
from corpus import make_documents, write_jsonl
from test_train_loop import SMALL_MODEL
from trainer.summary import read_summary

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    corpus = write_jsonl(root / "corpus.jsonl", make_documents(400, seed=7))
    common = [
        *SMALL_MODEL, f"storage_path={root}", f"data.sources=[{{name:gen,path:{corpus}}}]", "data.workers=0",
        "data.val_fraction=0.2", "cluster.launcher=local", "cluster.num_workers=1", "train.loader_workers=0",
        "train.micro_batch_size=4", "train.warmup_steps=2",
    ]
    train_args = ["train", *common, "run.name=base", "train.max_steps=6", "train.checkpoint_every=2",
                  "train.eval_every=3", "logger=none"]
    assert main(train_args) == 0
    return root, common


def test_validation_loss_is_logged_at_the_configured_steps(workspace):
    root, _ = workspace
    records = [json.loads(line) for line in open(root / "outputs/base/metrics.jsonl")]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert all(r["val_perplexity"] == pytest.approx(2.718281828 ** r["val_loss"], rel=1e-6) for r in records if "val_loss" in r)
    assert read_summary(root / "outputs/base")["final_val_loss"] == records[-1]["val_loss"]


def test_eval_on_the_val_split_scores_every_sample_whatever_the_batch_size(workspace, capsys):
    from data_pipelines.manifest import read_manifest
    from trainer.checkpoint import read_client_state

    root, common = workspace
    step = root / "outputs/base/checkpoints/step_6"
    manifest = read_manifest(read_client_state(step)["config"]["data"]["dir"])
    samples = manifest.num_samples("val")
    assert samples >= 3
    scored = []
    for batch in (2, samples - 1):  # the second leaves one sample for a last, smaller batch
        assert main(["eval", str(step), *common, f"--batch-size={batch}"]) == 0
        line = capsys.readouterr().out
        scored.append((float(line.split("loss ")[1].split(" ")[0]), int(line.split("| ")[-1].split()[0].replace(",", ""))))
    assert scored[0][1] == scored[1][1] == samples * manifest.seq_len
    assert scored[0][0] == pytest.approx(scored[1][0], abs=2e-4)


def test_export_average_eval_and_generate(workspace, capsys):
    root, common = workspace
    assert main(["export", *common, "run.name=base", "--average", "2", f"--out={root / 'hf'}"]) == 0
    out = capsys.readouterr().out
    assert "average of step_4, step_6" in out and (root / "hf/config.json").is_file()
    assert all(line.startswith(("[export]", "  ")) for line in out.splitlines() if line), out  # no DeepSpeed chatter
    assert (root / "hf/tokenizer.json").is_file()
    assert "not the run's last step" not in out
    step4 = root / "outputs/base/checkpoints/step_4"  # an earlier step, as a stopped run's export is
    assert main(["export", "--checkpoint", str(step4), *common, f"--out={root / 'hf_step4'}"]) == 0  # overrides taken back
    assert ("note         step_4 is not the run's last step (train.max_steps=6): it stopped early or is still "
            "training") in capsys.readouterr().out
    import shutil  # checkpoints of two runs: each named with its run

    shutil.copytree(step4, root / "outputs/copy/checkpoints/step_4")
    two_runs = [str(root / "outputs/copy/checkpoints/step_4"), str(root / "outputs/base/checkpoints/step_6")]
    assert main(["export", *common, "--checkpoint", *two_runs, f"--out={root / 'hf_two_runs'}"]) == 0
    out = capsys.readouterr().out
    assert "average of copy/step_4, base/step_6" in out
    assert "note         copy/step_4 is not the run's last step (train.max_steps=6)" in out and "base/step_6 is" not in out
    # Without --out: the checkpoint's own run's hf/, never the run.dir of the command line's config.
    assert main(["export", *common, "--checkpoint", two_runs[0]]) == 0
    assert (root / "outputs/copy/hf/config.json").is_file()
    assert sorted(p.parent.name for p in (root / "outputs").glob("*/hf")) == ["copy"]
    capsys.readouterr()
    assert main(["export", *common, "--checkpoint", *two_runs]) == 1
    assert ("--checkpoint: checkpoints of several runs belong to no one run directory to export into: give --out "
            "<dir>") in capsys.readouterr().err

    assert main(["export", *common, "run.name=base", f"--out={root / 'hf_last'}"]) == 0
    capsys.readouterr()
    losses = {}
    for path in (root / "outputs/base/checkpoints/step_6", root / "hf_last"):
        assert main(["eval", str(path), *common, "run.name=base", "--max-batches=3", "--batch-size=2"]) == 0
        line = capsys.readouterr().out
        losses[path.name] = float(line.split("loss ")[1].split(" ")[0])
    assert losses["step_6"] == losses["hf_last"]
    records = [json.loads(line) for line in open(root / "outputs/base/metrics.jsonl")]
    assert losses["step_6"] == pytest.approx(records[-1]["val_loss"], abs=0.2)  # 3 of the val batches

    assert main(["generate", str(root / "hf"), *common, "--prompt", "The database", "--greedy",
                 "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The database") and len(text.strip()) > len("The database")


def test_training_starts_from_a_hugging_face_directory(workspace, capsys):
    root, common = workspace
    assert main(["export", *common, "run.name=base", f"--out={root / 'hf_init'}"]) == 0
    args = [*common, "train.max_steps=2", "train.warmup_steps=1", "logger=none"]
    assert main(["train", *args, "run.name=scratch"]) == 0
    assert main(["train", *args, "run.name=from_hf", f"train.init_from={root / 'hf_init'}"]) == 0
    assert f"steps, from {root / 'hf_init'};" in capsys.readouterr().out  # the start line says so
    scratch = read_summary(root / "outputs/scratch")["losses"]
    assert read_summary(root / "outputs/from_hf")["init_from"] == str(root / "hf_init")
    from_hf = read_summary(root / "outputs/from_hf")["losses"]
    trained = read_summary(root / "outputs/base")["losses"]
    assert from_hf[0] < scratch[0] - 0.3 and from_hf[0] < trained[0] - 0.3

    # A model= other than the directory's architecture is refused, not silently replaced by it.
    assert main(["train", *args, "run.name=mismatch", f"train.init_from={root / 'hf_init'}", "model.num_layers=3"]) == 1
    err = capsys.readouterr().err
    assert "describes another model than model=openelm_tiny: layers 2 (model=openelm_tiny: 3)" in err
    assert not (root / "outputs/mismatch").exists()
    # A run refused once started (no val sample to validate on) leaves no empty run directory behind.
    assert main(["train", *args, "run.name=noval", "data.name=noval", "data.val_fraction=0", "train.eval_every=1"]) == 1
    assert "split 'val' of" in capsys.readouterr().err and not (root / "outputs/noval").exists()
    assert main(["train", *args, "run.name=two", "cluster.num_workers=2"]) == 1
    assert ("cluster.num_workers=2 but cluster.launcher=local trains in this one process: set cluster.num_workers=1, "
            "or start 2 with torchrun --nproc_per_node=2 -m cluster.cli train ...") in capsys.readouterr().err
    # Refused before any data is prepared: a dataset of another name is not built for a model that cannot start.
    vocab = main(["train", *args, "run.name=mismatch", f"train.init_from={root / 'hf_init'}", "data.name=other_vocab",
                  "tokenizer.vocab_size=512"])
    err = capsys.readouterr().err
    assert vocab == 1 and "vocab_size 300 (model=openelm_tiny: 512). Pick the model= that matches it (its vocabulary: " \
        "model.vocab_size=300, with data of its tokenizer)" in err, err
    assert not (root / "data/other_vocab").exists()

    # The directory's tokenizer must be the dataset's: the same file, or the same vocabulary saved otherwise.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = root / "hf_init/tokenizer.json"
    same = Tokenizer.from_file(str(tokenizer))
    tokenizer.write_text(same.to_str(pretty=False))  # other bytes, same tokens and ids
    assert main(["train", *args, "run.name=resaved", f"train.init_from={root / 'hf_init'}"]) == 0
    other = Tokenizer(models.BPE(unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.train_from_iterator(["another corpus altogether"] * 10,
                              trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]))
    other.save(str(tokenizer))
    capsys.readouterr()
    assert main(["train", *args, "run.name=other_tokenizer", f"train.init_from={root / 'hf_init'}"]) == 1
    err = capsys.readouterr().err
    assert f"train.init_from: the model's tokenizer {tokenizer} (" in err and "is not the one" in err, err
    fix = f"prepare the data with tokenizer=file tokenizer.path={tokenizer} tokenizer.vocab_size={other.get_vocab_size()} "
    assert fix in err, err
    assert not (root / "outputs/other_tokenizer/checkpoints").exists()
    # A tokenizer file the data would be prepared with is compared before it is.
    data_tokenizer = next((root / "data").glob("*/tokenizer.json"))
    assert main(["train", *args, "run.name=other_tokenizer", f"train.init_from={root / 'hf_init'}", "tokenizer=file",
                 f"tokenizer.path={data_tokenizer}", "tokenizer.vocab_size=300", "data.name=with_file"]) == 1
    err = capsys.readouterr().err
    assert f"is not tokenizer.path={data_tokenizer}, which the data is prepared with (" in err and fix in err, err
    assert not (root / "data/with_file").exists()


def test_a_run_started_from_a_hugging_face_directory_resumes_without_it(workspace, capsys):
    import shutil

    root, common = workspace
    source = root / "hf_moved_away"
    assert main(["export", *common, "run.name=base", f"--out={source}"]) == 0
    args = [*common, "train.warmup_steps=1", "logger=none", "run.name=tuned"]
    assert main(["train", *args, "train.max_steps=2", f"train.init_from={source}"]) == 0
    shutil.rmtree(source)
    capsys.readouterr()
    assert main(["train", *args, "train.max_steps=4", f"train.init_from={source}"]) == 2
    err = capsys.readouterr().err
    assert f"train.init_from={source}: does not exist: must be a Hugging Face directory with config.json" in err
    assert "a run that has a checkpoint resumes without it: leave train.init_from out" in err
    # Its layers were listed one by one in the directory's config.json; model= scales the same ones.
    assert main(["train", *args, "train.max_steps=4"]) == 0
    summary = read_summary(root / "outputs/tuned")
    assert summary["resumed_from"] == "step_2" and summary["steps"] == 4
    assert summary["init_from"] == str(source)  # where the run started, gone or not


def test_rerunning_a_finished_run_resumes_and_does_no_more_steps(workspace, capsys):
    root, common = workspace
    assert main(["train", *common, "run.name=base", "train.max_steps=6", "train.checkpoint_every=2",
                 "train.eval_every=3", "logger=none"]) == 0
    said = capsys.readouterr().out
    assert "already finished at step 6" in said and "a higher train.max_steps trains it on; another run.name" in said
    assert read_summary(root / "outputs/base")["final_loss"] is not None  # the summary stands
    assert len(open(root / "outputs/base/metrics.jsonl").readlines()) == 6
    # Lowered below where it got to: nothing to train, and the message says the run went past it.
    assert main(["train", *common, "run.name=base", "train.max_steps=4", "logger=none"]) == 0
    assert "already finished at step 6, past train.max_steps=4 (" in capsys.readouterr().out
    # A copy of the run (or one moved, with storage_path): its summary names where it is now.
    import shutil

    shutil.copytree(root / "outputs/base", root / "outputs/copied")
    assert main(["train", *common, "run.name=copied", "train.max_steps=6", "logger=none"]) == 0
    base, copied = read_summary(root / "outputs/base"), read_summary(root / "outputs/copied")
    assert copied["run_name"] == "copied" and copied["final_loss"] == base["final_loss"]
    assert copied["checkpoint"] == str(root / "outputs/copied/checkpoints/step_6")
    assert copied["metrics"] == str(root / "outputs/copied/metrics.jsonl")


def test_a_run_resumes_only_on_the_data_it_trained_on(workspace, capsys):
    from cluster.config import compose_config
    from trainer.train_loop import check_start

    root, common = workspace
    run = [*common, "run.name=base", "train.max_steps=8", "train.checkpoint_every=2", "logger=none"]
    dataset = next(root.glob("data/*/manifest.json")).parent
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dataset.iterdir() if p.is_file()}
    # Other data settings are refused before prepare could rebuild the run's dataset for them.
    assert main(["train", *run, "data.val_fraction=0.3", "data.seq_len=16"]) == 1
    err = capsys.readouterr().err
    assert ("run base resumes from step_6 on the data it trained on, but this launch asks for other data: "
            "data.seq_len=16 (it trained with 32), data.val_fraction=0.3 (it trained with 0.2)") in err, err
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dataset.iterdir() if p.is_file()} == before

    # So are changed input files; a finished run, which needs no data, still answers.
    corpus = root / "corpus.jsonl"
    original_corpus = corpus.read_bytes()
    try:
        corpus.write_bytes(original_corpus + b'{"text": "a document added since"}\n')
        assert main(["train", *run]) == 1
        assert "run base resumes from step_6 on the data it trained on, but its input files have changed since (" \
            in capsys.readouterr().err
        assert main(["train", *run, "train.max_steps=6"]) == 0
        assert "already finished at step 6" in capsys.readouterr().out
    finally:
        corpus.write_bytes(original_corpus)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in dataset.iterdir() if p.is_file()} == before

    # The dataset rebuilt since the checkpoint (say, from a corpus that changed) is refused at resume.
    manifest = dataset / "manifest.json"
    original = manifest.read_text()
    rebuilt = json.loads(original)
    rebuilt["source"]["fingerprint"] = "0123456789ab" + rebuilt["source"]["fingerprint"][12:]
    try:
        manifest.write_text(json.dumps(rebuilt))
        with pytest.raises(ValueError, match=r"step_6 was trained on the dataset in .* as it was built then "
                                             r"\(fingerprint [0-9a-f]{12}\); it has been rebuilt since .*\(0123456789ab\)"):
            check_start(compose_config(run))
    finally:
        manifest.write_text(original)
    check_start(compose_config(run))  # as built: resumable


def test_eval_scores_several_text_files_and_the_flags_are_checked(workspace, capsys, tmp_path):
    import shutil

    root, common = workspace
    assert main(["export", *common, "run.name=base", f"--out={root / 'hf_flags'}"]) == 0
    hf = str(root / "hf_flags")
    docs = make_documents(40, seed=3)
    files = [write_jsonl(tmp_path / f"{name}.jsonl", part) for name, part in (("a", docs[:20]), ("b", docs[20:]))]
    capsys.readouterr()

    def tokens(*text_files) -> int:
        # Overrides may follow the files: they are taken back from --text.
        assert main(["eval", hf, "--text", *map(str, text_files), *common, "--seq-len=16"]) == 0
        line = capsys.readouterr().out
        assert all(str(f) in line for f in text_files), line
        return int(line.rsplit("| ", 1)[1].split(" tokens")[0].replace(",", ""))

    both, first, second = tokens(*files), tokens(files[0]), tokens(files[1])
    partition = tmp_path / "lang=en"  # a path with `=` that is a file, not an override
    partition.mkdir()
    assert tokens(shutil.copy(files[0], partition)) == first
    assert main(["eval", *common, hf, "--text", str(files[0]), "--seq-len=16"]) == 0  # the path after overrides
    assert capsys.readouterr().out.rstrip().endswith(f"| {first:,} tokens")
    assert first < both and second < both and both >= first + second - 2 * 17  # a dropped tail per run at most
    assert main(["eval", hf, "--text", *map(str, files), "--seq-len=16", "--batch-size=1", "--max-batches=2",
                 *common]) == 0
    assert capsys.readouterr().out.rstrip().endswith("| 32 tokens")  # two batches of one 16-token sample
    # A checkpoint is scored at the length it trained at (32, where the default data.seq_len is 128).
    step = str(root / "outputs/base/checkpoints/step_6")
    assert main(["eval", step, "--text", *map(str, files), "--batch-size=1", "--max-batches=2"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("| 64 tokens")

    for argv, message in [
        (["generate", hf, "--prompt", "x", "--temperature", "0"], "argument --temperature: must be finite and > 0, got 0"),
        (["generate", hf, "--prompt", "x", "--top-k", "-1"], "argument --top-k: must be > 0, got -1"),
        (["generate", hf, "--prompt", "x", "--greedy", "--temperature", "0.7"], "--greedy always takes the most likely"),
        (["export", "run.name=base", "--average", "0"], "argument --average: must be > 0, got 0"),
        (["export", "--checkpoint", "step_6", "--average", "2"], "argument --average: not allowed with argument"),
        (["eval", hf, "--batch-size", "0"], "argument --batch-size: must be > 0, got 0"),
        (["eval", hf, "--seq-len", "16"], "--seq-len applies to --text only"),
        (["eval", hf, "--text-field", "body"], "--text-field applies to --text only"),
        (["eval", hf, "--separator", "x"], "--separator applies to --text only"),
        (["eval", hf, "--text", "a.txt", "--separator="], "--separator: give the string documents end at"),
        (["generate", hf, "--prompt", "x", "--temperature", "nan"], "argument --temperature: must be finite and > 0"),
        (["generate", hf, "--greedy", "--top-k", "2"], "elmforge generate: error: the following arguments are"),
        (["eval"], "elmforge eval: error: the following arguments are required: path\n"),  # not the overrides
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, *common])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv


def test_a_model_without_a_tokenizer_takes_one_from_the_command_line(workspace, capsys):
    import shutil

    root, common = workspace
    assert main(["export", *common, "run.name=base", f"--out={root / 'hf_tok'}"]) == 0
    bare = root / "hf_no_tokenizer"  # as Apple's release: config.json and weights only
    shutil.copytree(root / "hf_tok", bare)
    (bare / "tokenizer.json").unlink()
    capsys.readouterr()
    args = ["--prompt", "The database", "--greedy", "--max-new-tokens", "6"]
    assert main(["generate", str(bare), *args, *common]) == 1
    assert "name one with --tokenizer" in capsys.readouterr().err
    assert main(["generate", str(root / "hf_tok"), *args, *common]) == 0
    with_own = capsys.readouterr().out
    assert main(["generate", str(bare), *args, "--tokenizer", str(root / "hf_tok/tokenizer.json"), *common]) == 0
    assert capsys.readouterr().out == with_own
    # A prepared dataset named with data.dir= lends its tokenizer (the one the model was trained with here).
    data_dir = read_summary(root / "outputs/base")["data_dir"]
    assert main(["generate", str(bare), *args, *common, f"data.dir={data_dir}"]) == 0
    assert capsys.readouterr().out == with_own
    # Without a tokenizer nothing tells which val split suits the model: the data must be named.
    assert main(["eval", str(bare), *common, "--max-batches=1"]) == 1
    assert "no tokenizer beside the model" in capsys.readouterr().err
    assert main(["eval", str(bare), *common, f"data.dir={data_dir}", "--max-batches=1"]) == 0
    assert f"on {data_dir} (val split)" in capsys.readouterr().out
    # A tokenizer saved otherwise (as transformers re-saves it) gives the same ids: accepted; other ids are not.
    saved = json.loads((root / "hf_tok/tokenizer.json").read_text())
    (root / "resaved.json").write_text(json.dumps(saved, indent=1))
    vocab = saved["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[-2:]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (root / "other_ids.json").write_text(json.dumps(saved))
    scored = ["eval", str(bare), *common, f"data.dir={data_dir}", "--max-batches=1", "--tokenizer"]
    assert main([*scored, str(root / "resaved.json")]) == 0
    assert main([*scored, str(root / "other_ids.json")]) == 1
    assert (f"--tokenizer {root / 'other_ids.json'} (") in (err := capsys.readouterr().err), err
    assert f"is not the one {data_dir} was tokenized with (" in err and "score on data prepared with it" in err
    # A model that carries its tokenizer takes another only with the same ids.
    text = write_jsonl(root / "scored.jsonl", make_documents(10, seed=8))
    own = ["eval", str(root / "hf_tok"), *common, "--text", str(text), "--seq-len=16", "--tokenizer"]
    assert main([*own, str(root / "resaved.json")]) == 0
    capsys.readouterr()
    assert main([*own, str(root / "other_ids.json")]) == 1
    assert (f"--tokenizer {root / 'other_ids.json'} (") in (err := capsys.readouterr().err) and (
        f"has other tokens or ids than the tokenizer found with {root / 'hf_tok'} (") in err, err
    # --cfg job needs no prompt.
    assert main(["generate", str(bare), "--cfg", "job", *common]) == 0
    assert "run:" in capsys.readouterr().out


def test_export_refuses_an_unfinished_checkpoint_and_leaves_out_a_changed_tokenizer(workspace, tmp_path, capsys):
    import shutil

    root, common = workspace
    partial = tmp_path / "step_6"  # as a crash mid-save leaves it: no COMPLETE marker
    shutil.copytree(root / "outputs/base/checkpoints/step_6", partial)
    (partial / "COMPLETE").unlink()
    assert main(["export", *common, "--checkpoint", str(partial), f"--out={tmp_path / 'hf'}"]) == 1
    assert f"{partial}: checkpoint has no COMPLETE marker" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()

    # The run's dataset re-prepared with another tokenizer: its file is not the model's.
    manifest = next(root.glob("data/*/manifest.json"))
    original = manifest.read_text()
    changed = json.loads(original)
    changed["tokenizer"]["fingerprint"] = "another-tokenizer"
    try:
        manifest.write_text(json.dumps(changed))
        assert main(["export", *common, "run.name=base", f"--out={tmp_path / 'hf'}"]) == 0
        assert "(no tokenizer: the training data at" in capsys.readouterr().out
        assert (tmp_path / "hf/config.json").is_file() and not (tmp_path / "hf/tokenizer.json").exists()
        step = str(root / "outputs/base/checkpoints/step_6")
        assert main(["generate", step, *common, "--prompt", "x", "--greedy"]) == 1  # nor used to read text
        assert "no tokenizer beside the model" in capsys.readouterr().err
    finally:
        manifest.write_text(original)
    manifest.rename(manifest.with_suffix(".moved"))  # the run's dataset gone: its checkpoint has none to score on
    try:
        assert main(["eval", step, *common]) == 1
        assert f"{step} trained on {manifest.parent}, which holds no prepared dataset now: name one with data.dir=" \
            in capsys.readouterr().err
    finally:
        manifest.with_suffix(".moved").rename(manifest)


def test_eval_and_export_name_what_is_wrong_with_their_inputs(workspace, tmp_path, capsys):
    import shutil

    import torch

    root, common = workspace
    run = root / "outputs/base"

    def fails(*argv) -> str:
        assert main([*argv, *common]) == 1
        return capsys.readouterr().err

    assert f"{run}/checkpoints/step_99: does not exist ({run}/checkpoints holds step_2, step_4, step_6)" in fails(
        "eval", str(run / "checkpoints/step_99"))
    assert f"{run} is a run directory: give one of its checkpoints ({run}/checkpoints/step_6)" in fails(
        "eval", str(run))
    assert "no such checkpoint directory" in fails("export", "--checkpoint", str(run / "checkpoints/step_9"))
    assert f"{run} is a run directory, not a checkpoint: give one of its checkpoints ({run}/checkpoints/step_6)" in \
        fails("export", "--checkpoint", str(run), f"--out={tmp_path / 'x'}")
    assert (f"--average 5: only 3 complete checkpoints in {run}/checkpoints (step_2, step_4, step_6): average at most 3, "
            "or keep more while training (train.keep_checkpoints=5 or more") in fails("export", "run.name=base", "--average", "5")
    step6 = str(run / "checkpoints/step_6")
    assert "a checkpoint is given twice" in fails("export", "--checkpoint", step6, step6, f"--out={tmp_path / 'x'}")

    # Checkpoints of another tokenizer cannot be averaged in: their embedding rows mean other tokens.
    other = tmp_path / "other/step_4"
    shutil.copytree(run / "checkpoints/step_4", other)
    states = other / "mp_rank_00_model_states.pt"
    saved = torch.load(states, weights_only=True)
    torch.save({**saved, "tokenizer_fingerprint": "f" * 64}, states)
    (other / "COMPLETE").write_text('{"step": 4}\n')  # as saved so: no recorded digests to differ from
    err = fails("export", "--checkpoint", str(other), step6, f"--out={tmp_path / 'x'}")
    assert f"trained with different tokenizers ({other} ffffffffffff, {step6} " in err, err
    assert not (tmp_path / "x").exists()
    # One tokenizer saved otherwise (a dataset prepared with a re-saved export's tokenizer.json) is one.
    import hashlib

    data = tmp_path / "resaved_data"
    shutil.copytree(torch.load(states, weights_only=True)["config"]["data"]["dir"], data)
    (data / "tokenizer.json").write_text(json.dumps(json.loads((data / "tokenizer.json").read_text()), indent=3))
    fingerprint = hashlib.sha256((data / "tokenizer.json").read_bytes()).hexdigest()
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = fingerprint
    (data / "manifest.json").write_text(json.dumps(manifest))
    config = {**saved["config"], "data": {**saved["config"]["data"], "dir": str(data)}}
    torch.save({**saved, "tokenizer_fingerprint": fingerprint, "config": config}, states)
    assert main(["export", "--checkpoint", str(other), step6, f"--out={tmp_path / 'averaged'}", *common]) == 0
    assert f"{tmp_path / 'averaged'}: average of {tmp_path.name}/step_4, base/step_6" in capsys.readouterr().out

    # A damaged file in a checkpoint (a truncated optimizer partition) is named, in one line, by each verb.
    damaged = tmp_path / "damaged/step_6"
    shutil.copytree(run / "checkpoints/step_6", damaged)
    partition = next(damaged.glob("*_optim_states.pt"))
    partition.write_bytes(partition.read_bytes()[:1000])
    for argv in (["export", "--checkpoint", str(damaged), f"--out={tmp_path / 'x'}"], ["eval", str(damaged)],
                 ["generate", str(damaged), "--prompt", "x", "--greedy"]):
        err = fails(*argv)
        assert f"checkpoint {damaged} cannot be read (" in err and "a file in it is damaged or incomplete" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "x").exists()

    # --text: a directory is named as one; a record without the text field names the fix.
    assert main(["export", *common, "run.name=base", f"--out={tmp_path / 'hf'}"]) == 0
    hf = str(tmp_path / "hf")
    texts = tmp_path / "texts"
    texts.mkdir()
    assert f"data source '{texts}' is a directory: name its files, e.g. {texts}/*.jsonl" in fails(
        "eval", hf, "--text", str(texts))
    docs = make_documents(20, seed=4)
    write_jsonl(texts / "body.jsonl", docs, field="body")
    err = fails("eval", hf, "--text", str(texts / "body.jsonl"), "--seq-len=16")
    assert f"{texts}/body.jsonl:1: bad record (missing_text_field: no field 'text'; its fields: body, id)" in err, err
    assert "name the field that holds the text (--text-field)" in err
    assert main(["eval", hf, "--text", str(texts / "body.jsonl"), "--text-field", "body", "--seq-len=16", *common]) == 0
    if not torch.cuda.is_available():
        assert "cluster.use_gpu=true needs 1 GPU to run the model on" in fails(
            "generate", hf, "--prompt", "x", "cluster.use_gpu=true")
    assert "--seq-len 4096: longer than the model's context" in fails(
        "eval", hf, "--text", str(texts / "body.jsonl"), "--text-field", "body", "--seq-len=4096")


@pytest.mark.parametrize("verb, key", [("train", "run.dir"), ("train", "data.dir"), ("prepare", "data.dir")])
def test_a_directory_that_cannot_be_created_is_named_before_any_work(verb, key, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert main([verb, f"storage_path={tmp_path}", f"{key}={tmp_path / 'a_file/sub'}", "logger=none"]) == 1
    assert f"{key}={tmp_path / 'a_file/sub'}: cannot be created, {tmp_path / 'a_file'} is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing prepared, nothing started
