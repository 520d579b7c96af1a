import io
import json
import shutil

import pytest
import torch
from helpers import cache_imagenet_weights, noise_image, random_encoder_file, run_byol, shapes_folder

from byolcli.core.errors import UserError
from byolcli.core.labels import drop_missing, read_labels
from byolcli.evaluation.evaluate import make_protocol, score
from byolcli.evaluation.logistic import fit_logistic
from byolcli.evaluation.metrics import knn_scores, linear_probe_scores, summarize


def blobs(per_class=100, classes=4, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=generator) * 5
    y = torch.arange(classes).repeat_interleave(per_class)
    x = centers[y] + torch.randn(len(y), dim, generator=generator)
    return x, y


def halves(x, y):
    train = torch.arange(len(y)) % 2 == 0
    return x[train], y[train], x[~train], y[~train]


def test_knn_and_linear_probe_separate_separable_classes():
    train_x, train_y, test_x, test_y = halves(*blobs())
    assert summarize(knn_scores(train_x, train_y, test_x, 4), test_y, 4)["top1"] == 1.0
    logits, _, _ = linear_probe_scores(train_x, train_y, test_x, 4)
    result = summarize(logits, test_y, 4)
    assert result["top1"] == 1.0 and result["balanced"] == 1.0


def test_shuffled_labels_score_at_chance():
    x, y = blobs(per_class=200)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    train_x, train_y, test_x, test_y = halves(x, y)
    knn = summarize(knn_scores(train_x, train_y, test_x, 4), test_y, 4)["top1"]
    linear = summarize(linear_probe_scores(train_x, train_y, test_x, 4)[0], test_y, 4)["top1"]
    assert 0.15 < knn < 0.35 and 0.15 < linear < 0.35


def test_strengths_fitted_together_each_reach_their_own_optimum():
    x, y = blobs(per_class=30, classes=3, dim=8)
    decays = [1e-3, 1e-1, 10.0]
    w, b = fit_logistic(x, y, 3, decays)
    for i, decay in enumerate(decays):
        alone_w, alone_b = fit_logistic(x, y, 3, [decay])
        assert (w[i] - alone_w[0]).norm() < 1e-3 * alone_w[0].norm()  # the others do not change its path
        weight, bias = w[i].clone().requires_grad_(), b[i].clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + decay * weight.pow(2).sum()
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [weight, bias])])
        assert grad.abs().max() < 1e-4, (decay, grad.abs().max())  # a minimum, not just a step towards one
    assert w[2].norm() < w[1].norm() < w[0].norm()


def test_top5_and_per_class_recall():
    scores = torch.tensor([[0.9, 0.1, 0, 0, 0, 0, 0], [0.1, 0.9, 0, 0, 0, 0, 0.5]])
    result = summarize(scores, torch.tensor([0, 6]), 7)
    assert result["top1"] == 0.5 and result["top5"] == 1.0
    assert result["per_class_recall"][0] == 1.0 and result["per_class_recall"][6] == 0.0


def write_csv(path, text, encoding="utf-8", newline="\n"):
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


@pytest.fixture
def labelled(tmp_path):
    names = ["a b.png", "ü,1.png", "c.png", "d.png", "e.png", "f.png"]
    for i, name in enumerate(names):
        noise_image(seed=i).save(tmp_path / name)
    return tmp_path, names


def test_csv_variants_are_read_alike(labelled):
    folder, names = labelled
    quoted = [f'"{n}"' if "," in n else n for n in names]
    body = "".join(f"{q},{'cat' if i % 2 else 'dog'}\n" for i, q in enumerate(quoted))
    variants = [
        write_csv(folder / "plain.csv", "path,label\n" + body),
        write_csv(folder / "bom_crlf.csv", "\ufefffile,class\n" + body, encoding="utf-8", newline="\r\n"),
        write_csv(folder / "other.csv", "Filename,Category,extra\n" + body.replace("\n", ",x\n")),
    ]
    for csv_path in variants:
        data = read_labels(csv_path)
        assert [p.name for p in data.paths] == names, csv_path.name
        assert data.labels == ["dog", "cat"] * 3 and not data.missing and data.splits is None


def test_split_column_is_honoured_without_leakage(labelled):
    folder, names = labelled
    splits = ["train", "test", "train", "validation", "train", "test"]
    rows = "".join(f'"{n}",{"ab"[i % 2]},{s}\n' for i, (n, s) in enumerate(zip(names, splits)))
    data = read_labels(write_csv(folder / "l.csv", "path,label,split\n" + rows))
    y = torch.tensor([0, 1] * 3)
    ((train, test, val),) = make_protocol(data, y, folder / "l.csv").folds
    assert train.tolist() == [0, 2, 4] and test.tolist() == [1, 5] and val.tolist() == [3]


def test_cross_validation_tests_every_row_once_and_never_trains_on_it():
    x, y = blobs(per_class=7, classes=3)
    from byolcli.core.labels import LabelledImages

    data = LabelledImages([None] * len(y), [str(int(v)) for v in y], None, list(range(2, len(y) + 2)), [])
    protocol = make_protocol(data, y, "x.csv")
    assert len(protocol.folds) == 5
    tested = torch.cat([test for _, test, _ in protocol.folds])
    assert sorted(tested.tolist()) == list(range(len(y)))
    for train, test, _ in protocol.folds:
        assert not set(train.tolist()) & set(test.tolist())
    assert score(x, y, 3, protocol)["knn"]["top1"] == 1.0


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty file"),
        ("name,colour\nx.png,red\n", "line 1: the header has no image path column"),
        ("path,colour\nx.png,red\n", "line 1: the header has no label column"),
        ("path,label\nc.png,a\nd.png,a\n", "only one class"),
        ("path,label\nc.png,a\nd.png,a\ne.png,b\n", "line 4: class 'b' has only one image"),
        ("path,label\nc.png,a\nd.png,\n", "line 3: empty label"),
        ("path,label,split\nc.png,a,train\nd.png,b,holdout\n", "line 3: split 'holdout'"),
    ],
)
def test_bad_csvs_are_named_with_their_line(labelled, content, message):
    folder, _ = labelled
    csv_path = write_csv(folder / "bad.csv", content)
    with pytest.raises(UserError, match=message):
        data = read_labels(csv_path)
        make_protocol(data, torch.tensor([data.classes.index(v) for v in data.labels]), csv_path)


def test_binary_file_and_missing_files(labelled):
    folder, _ = labelled
    binary = folder / "model.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    with pytest.raises(UserError, match="a binary file"):
        read_labels(binary)
    csv_path = write_csv(folder / "m.csv", "path,label\nc.png,a\ngone.png,a\nd.png,b\nlost.png,b\n")
    data = read_labels(csv_path)
    with pytest.raises(UserError, match=r"2 listed files do not exist \(line 3: gone.png, line 5: lost.png\)"):
        drop_missing(data, csv_path, skip_missing=False)
    kept = drop_missing(data, csv_path, skip_missing=True)
    assert [p.name for p in kept.paths] == ["c.png", "d.png"]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return random_encoder_file(tmp_path_factory.mktemp("model") / "encoder.safetensors", seed=1)


def test_byol_evaluate_end_to_end(tmp_path, encoder_file):
    a = shapes_folder(tmp_path / "a", count=10)
    b = tmp_path / "b"
    b.mkdir()
    for i in range(10):
        noise_image((32, 32), seed=i).save(b / f"{i}.png")
    rows = [f"a/{p.name},shapes" for p in sorted(a.iterdir())] + [f"b/{p.name},noise" for p in sorted(b.iterdir())]
    csv_path = write_csv(tmp_path / "labels.csv", "image,class\n" + "\n".join(rows) + "\n")
    result = run_byol(
        "evaluate",
        "--labels",
        csv_path,
        "--model",
        encoder_file,
        "--json",
        tmp_path / "r.json",
        "--baseline",
        encoder_file,
        "--report",
        tmp_path / "gallery",
    )
    assert result.returncode == 0, result.stderr
    assert "random init" in result.stdout and "kNN top-1" in result.stdout and "5-fold" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["results"]) == {"encoder", "baseline", "random init"}
    assert report["sources"]["encoder"] == str(encoder_file)
    ours, same = report["results"]["encoder"], report["results"]["baseline"]
    assert ours["knn"] == same["knn"] and ours["linear"]["top1"] == same["linear"]["top1"]  # same file, same scores
    assert report["images"] == 20 and report["classes"] == ["noise", "shapes"]
    page = (tmp_path / "gallery" / "index.html").read_text()
    # fold 0 of 5 tests 2 images per class: 2 classes x 2 queries x (query + 8 neighbours)
    assert page.count("data:image/jpeg;base64,") == 2 * 2 * 9
    assert "confusion matrix" in page

    shutil.rmtree(b)
    missing = run_byol("evaluate", "--labels", csv_path, "--model", encoder_file)
    assert missing.returncode == 2 and "10 listed files do not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_imagenet_baseline_uses_torchvisions_weights_for_the_same_architecture(tmp_path, encoder_file):
    folder = shapes_folder(tmp_path / "a", count=10)
    rows = [f"a/{p.name},{'left' if i % 2 else 'right'}" for i, p in enumerate(sorted(folder.iterdir()))]
    csv_path = write_csv(tmp_path / "labels.csv", "image,class\n" + "\n".join(rows) + "\n")
    cache_imagenet_weights(tmp_path / "torch", seed=1)  # the same weights encoder_file holds
    result = run_byol(
        "evaluate",
        "--labels",
        csv_path,
        "--model",
        encoder_file,
        "--baseline",
        "imagenet",
        "--json",
        tmp_path / "r.json",
        env_extra={"TORCH_HOME": str(tmp_path / "torch")},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["sources"]["baseline"] == "imagenet (224 px)"  # the size the weights were trained at
    alone = run_byol(
        "evaluate",
        "--labels",
        csv_path,
        "--model",
        "imagenet",
        "--json",
        tmp_path / "alone.json",
        env_extra={"TORCH_HOME": str(tmp_path / "torch")},
    )
    assert alone.returncode == 0, alone.stderr
    assert (
        report["results"]["baseline"]["knn"]
        == json.loads((tmp_path / "alone.json").read_text())["results"]["encoder"]["knn"]
    )

    offline = run_byol(
        "evaluate",
        "--labels",
        csv_path,
        "--model",
        encoder_file,
        "--baseline",
        "imagenet",
        env_extra={
            "TORCH_HOME": str(tmp_path / "empty"),
            "https_proxy": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9",
        },
    )
    assert offline.returncode == 2 and len(offline.stderr.strip().splitlines()) == 1
    assert "none could be downloaded" in offline.stderr and "resnet18-f37072fd.pth" in offline.stderr


def test_past_five_thousand_rows_without_a_split_one_stratified_hold_out_replaces_the_folds(tmp_path):
    from byolcli.core.labels import LabelledImages
    from byolcli.evaluation.evaluate import HOLDOUT_ABOVE, make_protocol

    for rows, folds in ((HOLDOUT_ABOVE, 5), (HOLDOUT_ABOVE + 1, 1)):
        labels = [f"c{i % 3}" for i in range(rows)]
        data = LabelledImages([tmp_path / f"{i}.png" for i in range(rows)], labels, None, list(range(rows)), [])
        y = torch.tensor([int(label[1]) for label in labels])
        protocol = make_protocol(data, y, tmp_path / "labels.csv")
        assert len(protocol.folds) == folds, protocol.name
        tested = torch.cat([test for _, test, _ in protocol.folds])
        if folds == 1:
            fit, test, _ = protocol.folds[0]
            assert set(fit.tolist()).isdisjoint(test.tolist()) and len(fit) + len(test) == rows
            assert abs(len(test) / rows - 0.2) < 0.01
            for c in range(3):  # stratified: each class a fifth in the test part
                assert abs((y[test] == c).sum().item() / (y == c).sum().item() - 0.2) < 0.01
        else:
            assert sorted(tested.tolist()) == list(range(rows))


def test_the_comparison_table_fits_an_80_column_terminal_without_wrapping(monkeypatch):
    from rich.console import Console

    from byolcli.evaluation import terminal

    console = Console(width=80, record=True, color_system=None, file=io.StringIO())
    monkeypatch.setattr(terminal, "out", console)
    networks = ["encoder", "start", "start at 224 px", "random init"]
    scores = {"top1": 0.573, "top5": 0.951, "balanced": 0.559, "per_class_recall": [0.5] * 10}
    results = {name: {"knn": dict(scores), "linear": dict(scores)} for name in networks}
    results["random init"]["knn"]["top1"] = 0.1  # a gain of two digits
    report = {"results": results, "images": 5000, "classes": list("abcdefghij"), "protocol": "5-fold"}
    terminal.evaluation_report({**report, "best_start": "start at 224 px"})
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    header = next(line for line in lines if line.startswith("metric"))
    assert all(name in header for name in [*networks, "Δ start", "Δ random"])  # each header whole, on one line
    rows = [line for line in lines if line.startswith(("kNN ", "linear "))]
    assert len(rows) == 6 and "+47.3" in rows[0]  # one line per score, none broken
