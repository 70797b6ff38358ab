
import pytest

from medxfer.cli import build_parser
from medxfer.commands.run import spec_from_args
from medxfer.config import DatasetArg, RunSpec, SpecError
from medxfer.report.tables import latex_table, results_csv, summary_markdown
from medxfer.results import SCHEMA, Result, load_results, read_result, write_result
from medxfer.testing import fake_result


def test_dataset_arg_parsing():
    assert DatasetArg.parse("shenzhen=/data/ChinaSet") == DatasetArg("shenzhen", "shenzhen", "/data/ChinaSet")
    a = DatasetArg.parse("mine=folder:/data/x:y")
    assert (a.label, a.kind, a.root, a.options) == ("mine", "folder", "/data/x:y", {"name": "mine"})
    assert DatasetArg.parse("m=csv:labels.csv").kind == "csv"
    with pytest.raises(SpecError, match="NAME=PATH"):
        DatasetArg.parse("nolabel")
    with pytest.raises(SpecError, match="label"):
        DatasetArg.parse("bad label=/x")


def test_run_spec_validation_and_yaml_round_trip(tmp_path):
    spec = RunSpec(models=("supervised-r18",), datasets=(DatasetArg.parse("a=folder:/x"),), seeds=(0, 1))
    path = tmp_path / "spec.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec.to_dict()))
    assert RunSpec.from_yaml(path) == spec
    with pytest.raises(SpecError, match="weights"):
        RunSpec(models=("m",), datasets=spec.datasets, weights="imagenet")
    with pytest.raises(SpecError, match="unknown field"):
        RunSpec.from_dict({"models": ["m"], "datasets": ["a=/x"], "epochs": 3})
    with pytest.raises(SpecError, match="used twice"):
        RunSpec(models=("m",), datasets=(DatasetArg.parse("a=/x"), DatasetArg.parse("a=folder:/y")))


def test_cli_arguments_become_a_run_spec(tmp_path):
    args = build_parser().parse_args([
        "run", "--models", "supervised-r18,test-tiny", "--dataset", "a=folder:/x", "--dataset", "shenzhen=/y",
        "--dataset-option", "shenzhen.split=paper", "--protocols", "fewshot", "--set", "fewshot.n_shot=5",
        "--weights", "random", "--seed", "3", "--seed", "4", "--out", str(tmp_path)])
    spec = spec_from_args(args)
    assert spec.models == ("supervised-r18", "test-tiny")
    assert spec.seeds == (3, 4)
    assert spec.protocol_params == {"fewshot": {"n_shot": 5}}
    assert spec.datasets[1].options == {"split": "paper"}
    assert spec.weights == "random"


def _result(model, dataset, acc, ci, seed=0, random=True):
    return fake_result(model, dataset, acc, ci, seed=seed, random_weights=random, episode_accuracies=[acc / 100] * 3)


def test_result_json_round_trip_and_schema(tmp_path):
    r = _result("m1", "d1", 70.0, 1.0)
    path = write_result(tmp_path / "m1.json", r)
    back = read_result(path)
    assert isinstance(back, Result) and back.schema == SCHEMA == "medxfer.result/2"
    assert back.to_dict() == r.to_dict() and back.episode_accuracies == [0.7] * 3
    d = back.to_dict()
    for key in ("model", "dataset", "protocol", "protocol_version", "run_key", "headline", "metrics", "params",
                "details", "warnings", "artifacts", "model_info", "dataset_info", "spec", "seed", "timings",
                "versions", "git_revision", "device"):
        assert key in d, key
    assert set(d["headline"]) == {"metric", "value", "ci95", "higher_is_better"}
    for key in ("family", "imagenet_top1", "normalization", "weights_hash", "random_weights"):
        assert key in d["model_info"], key
    for key in ("modality", "in_domain", "class_names", "counts", "headline_metric", "name", "label"):
        assert key in d["dataset_info"], key
    (tmp_path / "garbage.json").write_text("{not json")
    assert len(load_results(tmp_path)) == 1


def test_old_schema_results_are_refused_with_a_rerun_message(tmp_path, caplog):
    import json

    (tmp_path / "old.json").write_text(json.dumps({"schema": "medxfer.result/1", "model": "m", "metrics": {}}))
    with caplog.at_level("WARNING"):
        assert load_results(tmp_path) == []
    assert "medxfer.result/1" in caplog.text and "re-run" in caplog.text


def test_summary_marks_best_and_second_and_random_weights():
    results = [_result("a", "d1", 70.0, 1.0), _result("b", "d1", 80.0, 1.0), _result("c", "d1", 60.0, 1.0),
               _result("a", "d2", 50.0, 2.0)]
    md = summary_markdown(results)
    assert "**80.00 ± 1.00**" in md and "<u>70.00 ± 1.00</u>" in md and "| c [random weights] | 60.00 ± 1.00 |" in md
    assert "RANDOMLY INITIALISED" in md
    tex = latex_table(results, "fewshot")
    assert "\\textbf{80.00 $\\pm$ 1.00}" in tex and "\\underline{70.00 $\\pm$ 1.00}" in tex
    assert results_csv(results).splitlines()[0].startswith("model,dataset,protocol,table,seed")


def test_paired_difference_and_section():
    from medxfer.report.stats import paired_difference

    a = [0.8, 0.9, 0.7, 0.85]
    b = [0.7, 0.8, 0.65, 0.7]
    d = paired_difference(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    import statistics

    assert d.mean == pytest.approx(100 * statistics.mean(diffs))
    assert d.ci95 == pytest.approx(100 * 1.96 * statistics.stdev(diffs) / 2)
    assert 0 < d.p_value < 0.05
    assert paired_difference(a, a).p_value == 1.0
    with pytest.raises(ValueError):
        paired_difference(a, b[:3])
    r1 = fake_result("a", "d1", 70.0, 1.0, episode_accuracies=[0.7, 0.6, 0.8])
    r2 = fake_result("b", "d1", 80.0, 1.0, episode_accuracies=[0.8, 0.8, 0.8])
    md = summary_markdown([r1, r2])
    # a against b (the best) on the same three episodes: -10 points, t interval, Holm over one comparison
    assert "every model against the best" in md and "| d1 | a [random weights] | 70.00 | not sig. different | -10.00 [" in md


@pytest.mark.parametrize("field,value,message", [
    ("image_size", "big", "image_size: 'big': expected an integer"),
    ("seeds", "zero", "seeds: 'zero'"),
    ("batch_size", -3, "batch_size: -3 must be at least 1"),
    ("image_size", 7, "image_size: 7 is too small"),
    ("skip_bad", "nope", "skip_bad: 'nope': expected true or false"),
    ("workers", 1.5, "workers: 1.5"),
    ("weights", "imagenet", "weights: 'imagenet': expected one of"),
])
def test_run_spec_fields_are_validated_from_yaml_and_python(tmp_path, field, value, message):
    import yaml

    data = {"models": ["test-tiny"], "datasets": ["a=folder:/x"], field: value}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        RunSpec.from_yaml(path)
    assert str(path) in str(exc.value)  # the file is named
    with pytest.raises(SpecError, match=field):
        RunSpec(models=("test-tiny",), datasets=(DatasetArg.parse("a=folder:/x"),), **{field: value})


def test_cli_values_are_validated_with_the_field_named(tmp_path, capsys):
    from medxfer.cli import main

    rc = main(["run", "--models", "test-tiny", "--dataset", f"a=folder:{tmp_path}", "--image-size", "7",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "image_size: 7 is too small" in capsys.readouterr().err
