"""`--dataset folder:PATH`: layouts, classes and file order as torchvision's ImageFolder, the split by
--val-size, the bad input, the leakage guard on decoded pixels, and the sweep with every loader.
The loaders' own agreement tests are in test_torchvision_folder.py, test_torch_folder.py and
test_dali_folder.py."""
import importlib
import importlib.util
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

import pipelines.folder
from bench.evaluate import main as evaluate_main
from bench.run import main
from pipelines import load_dataset, overlap, select_splits
from pipelines.data import DataError, stratified_split
from pipelines.folder import load_folder, read_rgb
from tests.folder_helpers import make_tree

RUN = ["--profile", "smoke", "--device", "cpu", "--weights", "none", "--batch-size", "8", "--epochs", "1",
       "--unfreeze", "1", "--workers", "1", "--no-evaluate-best", "--loader", "torchvision"]


def run(tmp_path, root, *args) -> int:
    return main([*RUN, "--dataset", f"folder:{root}", "--data-dir", str(tmp_path / "cache"), *args])


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_classes_and_files_in_imagefolders_order(tmp_path):
    root = make_tree(tmp_path / "tree", num_classes=4, per_class=6)
    (root / "c1" / "nested").mkdir()
    shutil.copy(root / "c1" / "00001.png", root / "c1" / "nested" / "a.png")  # ImageFolder walks subfolders
    splits, classes, info = load_folder(root)
    reference = ImageFolder(str(root))
    assert classes == reference.classes
    assert list(splits["train"].files) == [path for path, _ in reference.samples]
    assert splits["train"].labels.tolist() == [label for _, label in reference.samples]
    assert info.layout == "tree" and info.images == {"train": 25} and info.ignored_files == 0


def test_pixels_are_imagefolders_rgb_for_every_mode(tmp_path):
    """Grey, CMYK, alpha and palette files become the RGB ImageFolder gives (the tree has all five modes)."""
    root = make_tree(tmp_path / "tree", num_classes=2, per_class=5)
    modes = set()
    for path, _ in ImageFolder(str(root)).samples:
        modes.add(Image.open(path).mode)
        pixels = read_rgb(path)
        assert pixels.dtype == np.uint8 and pixels.shape[2] == 3
        assert np.array_equal(pixels, np.asarray(ImageFolder(str(root)).loader(path)))
    assert modes == {"RGB", "L", "CMYK", "RGBA", "P"}


def test_splits_layout_and_the_tree_split_by_count_or_fraction(tmp_path):
    splits = make_tree(tmp_path / "splits", num_classes=3, per_class=12, layout="splits")
    data = load_dataset(f"folder:{splits}", val_size=0.5, seed=0)  # val/ is given: --val-size does not apply
    assert (len(data.train), len(data.val), data.test) == (24, 12, None)
    with pytest.raises(DataError, match="no test split"):
        select_splits(data, "test", final=False)
    tree = make_tree(tmp_path / "tree", num_classes=3, per_class=12)
    by_count = load_dataset(f"folder:{tree}", val_size=6, seed=0)
    assert np.bincount(by_count.val.labels).tolist() == [2, 2, 2] and len(by_count.train) == 30
    by_share = load_dataset(f"folder:{tree}", val_size=0.25, seed=0)
    assert np.bincount(by_share.val.labels).tolist() == [3, 3, 3]
    assert not set(by_share.train.files) & set(by_share.val.files)
    assert load_dataset(f"folder:{tree}", val_size=0.25, seed=1).val.files.tolist() != by_share.val.files.tolist()


def test_a_fraction_is_taken_from_every_class_of_an_unbalanced_tree():
    labels = np.repeat([0, 1, 2], [100, 10, 3])
    train, val = stratified_split(labels, 0.1, seed=0)
    assert np.bincount(labels[val]).tolist() == [10, 1, 1] and len(train) + len(val) == 113
    with pytest.raises(DataError, match="smallest has 3"):
        stratified_split(labels, 9, seed=0)  # 3 per class would leave class 2 no training image


def test_the_guard_hashes_decoded_pixels(tmp_path):
    """A training image saved again as PNG under another name in val/ is a copy; the same photograph
    re-encoded as a lossy JPEG is not caught (its pixels differ), as the README says."""
    root = make_tree(tmp_path / "splits", num_classes=3, per_class=12, layout="splits")
    source = sorted((root / "train" / "c0").glob("*.jpg"))[0]
    Image.open(source).save(root / "val" / "c0" / "zz_resaved.png")
    shutil.copy(source, root / "val" / "c0" / "zz_renamed.jpeg")
    Image.open(source).convert("RGB").save(root / "val" / "c0" / "zz_reencoded.jpg", quality=75)
    data = load_dataset(f"folder:{root}", val_size=0.1, seed=0)
    assert overlap(data.train, data.val) == 2


def test_a_resaved_training_image_in_val_withholds_accuracy(tmp_path):
    root = make_tree(tmp_path / "splits", num_classes=3, per_class=12, layout="splits")
    Image.open(sorted((root / "train" / "c2").glob("*.png"))[0]).save(root / "val" / "c2" / "copy.png", optimize=True)
    out = tmp_path / "run"
    assert run(tmp_path, root, "--out", str(out)) == 1
    result = json.loads((out / "results.json").read_text())
    assert result["run"]["eval_overlap"] == 1 and result["rows"][0]["status"] == "overlap"


def _bad(root):
    """Variations on a good tree, each with one thing wrong."""
    make_tree(root / "good", num_classes=3, per_class=6)
    make_tree(root / "splits", num_classes=3, per_class=9, layout="splits")


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("a_file", "not a directory"),
    ("empty", "no class folders"),
    ("one_class", "one class folder"),
    ("no_images", "c1 has no images"),
    ("val_classes", "val/ and train/ have different classes (only in train/: c2; only in val/: -)"),
    ("train_only", "has train/ but no val/"),
    ("corrupt", "bad.jpg: not a readable image"),
    ("truncated", "cut.png: not a readable image"),
])
def test_bad_folders_are_one_line_exit_2_and_nothing_written(tmp_path, capsys, case, message):
    _bad(tmp_path)
    root = tmp_path / case
    if case == "a_file":
        root.write_text("not a folder")
    elif case == "empty":
        root.mkdir()
    elif case == "one_class":
        shutil.copytree(tmp_path / "good" / "c0", root / "c0")
    elif case == "no_images":
        shutil.copytree(tmp_path / "good", root)
        for f in (root / "c1").iterdir():
            f.rename(f.with_suffix(".txt"))
    elif case == "val_classes":
        shutil.copytree(tmp_path / "splits", root)
        shutil.rmtree(root / "val" / "c2")
    elif case == "train_only":
        shutil.copytree(tmp_path / "splits" / "train", root / "train")
    elif case == "corrupt":
        shutil.copytree(tmp_path / "good", root)
        (root / "c0" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    elif case == "truncated":
        shutil.copytree(tmp_path / "good", root)
        png = sorted(root.rglob("*.png"))[0]
        (png.parent / "cut.png").write_bytes(png.read_bytes()[:200])
    out = tmp_path / "run"
    assert run(tmp_path, root, "--out", str(out)) == 2
    assert message in one_line(capsys)
    assert not out.exists()


def test_skip_bad_images_counts_them_and_other_files_are_ignored(tmp_path, capsys):
    root = make_tree(tmp_path / "tree", num_classes=3, per_class=12)
    (root / "c0" / "bad.jpg").write_bytes(b"not an image at all")  # a 37th file
    (root / "c1" / "notes.txt").write_text("a file that is not an image")
    (root / "c2" / ".DS_Store").write_bytes(b"\0\0")
    out = tmp_path / "run"
    assert run(tmp_path, root, "--out", str(out)) == 2
    assert "bad.jpg: not a readable image" in one_line(capsys)
    assert run(tmp_path, root, "--skip-bad-images", "--out", str(out)) == 0
    info = json.loads((out / "results.json").read_text())["run"]
    assert info["data_info"]["ignored_files"] == 2
    assert info["data_info"]["skipped_images"] == [str(root / "c0" / "bad.jpg")]
    assert info["train_images"] + info["eval_images"] == 36
    assert "2 files without an image extension ignored, 1 unreadable images skipped" in capsys.readouterr().out


def test_digests_are_cached_and_a_changed_file_is_decoded_again(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tree", num_classes=2, per_class=6)
    first, _, _ = load_folder(root, data_dir=tmp_path / "cache")
    decoded = []
    real = pipelines.folder._decode_digest
    monkeypatch.setattr(pipelines.folder, "_decode_digest", lambda f: decoded.append(f) or real(f))
    again, _, _ = load_folder(root, data_dir=tmp_path / "cache")
    assert decoded == [] and again["train"].digests.tolist() == first["train"].digests.tolist()
    changed = root / "c1" / "00001.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(changed)
    third, _, _ = load_folder(root, data_dir=tmp_path / "cache")
    assert decoded == [str(changed)]
    assert third["train"].digests.tolist() != first["train"].digests.tolist()


LOADERS = ["torchvision", "torch", "dali"]


def _available(loader: str) -> bool:
    module = {"torchvision": "pipelines.torchvision_folder", "torch": "pipelines.torch_folder",
              "dali": "pipelines.dali_folder"}[loader]
    return importlib.util.find_spec(module) is not None and (
        loader != "dali" or importlib.util.find_spec("nvidia.dali") is not None)


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("augment", ["flip-crop", "heavy"])
def test_the_sweep_runs_on_a_folder_with_every_loader(tmp_path, loader, augment):
    if not _available(loader):
        pytest.skip(f"--loader {loader} has no folder loader here")
    if loader == "dali":
        problem = importlib.import_module("pipelines.dali_folder").decoder_problem("cpu", None)
        if problem is not None:
            pytest.skip(f"DALI's CPU image decoder does not run here: {problem}")
    root = make_tree(tmp_path / "splits", num_classes=3, per_class=16, layout="splits")
    out = tmp_path / "run"
    assert run(tmp_path, root, "--loader", loader, "--augment", augment, "--unfreeze", "1,25", "--image-size", "40",
               "--out", str(out)) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in result["rows"]] == ["ok", "ok"]
    assert result["run"]["dataset"] == f"folder:{root}" and result["run"]["classes"] == ["c0", "c1", "c2"]
    assert (result["run"]["train_images"], result["run"]["eval_images"]) == (32, 16)
    assert result["run"]["normalize"] == "imagenet"  # the folder default when --normalize is not given


@pytest.mark.slow
def test_feature_cache_with_augment_none(tmp_path):
    """--augment none trains on the evaluation view, decoded once into the cache."""
    root = make_tree(tmp_path / "splits", num_classes=3, per_class=16, layout="splits")
    tops = {}
    for cache in ("--feature-cache", "--no-feature-cache"):
        out = tmp_path / cache
        assert run(tmp_path, root, "--loader", "torchvision", "--augment", "none", cache, "--out", str(out)) == 0
        row = json.loads((out / "results.json").read_text())["rows"][0]
        assert row["status"] == "ok"
        tops[cache] = (row["top1"], row["feature_cache_s"])
    assert tops["--feature-cache"][1] > 0 and tops["--no-feature-cache"][1] is None


@pytest.mark.slow
def test_resume_and_evaluate_rebuild_the_folder_from_the_stored_settings(tmp_path, monkeypatch, capsys):
    root = make_tree(tmp_path / "tree", num_classes=3, per_class=16)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    # a relative PATH is stored absolute: the resumed run and the checkpoint work from anywhere
    assert run(tmp_path, "tree", "--loader", "torchvision", "--unfreeze", "1,3", "--save-checkpoint",
               "--out", str(out)) == 0
    monkeypatch.chdir(tmp_path / "tree")
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["dataset"] == f"folder:{root}" and results["run"]["val_size"] == 0.1
    kept = results["rows"][0]
    results["rows"] = results["rows"][:1]
    (out / "results.json").write_text(json.dumps(results))
    assert main(["--resume", str(out), "--data-dir", str(tmp_path / "cache")]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["unfreeze-1", "unfreeze-3"] and rows[0] == kept
    capsys.readouterr()
    assert evaluate_main([str(out / "checkpoints" / "unfreeze-3.pt"), "--device", "cpu",
                          "--out", str(tmp_path / "scored")]) == 0
    scored = json.loads((tmp_path / "scored" / "evaluation.json").read_text())
    assert scored["dataset"] == f"folder:{root}" and scored["top1"] == rows[1]["top1"] and scored["images"] == 6
    assert (tmp_path / "scored" / "predictions.png").stat().st_size > 10_000
