"""Config composition: entry points, presets, the judge, and what may be logged."""

import inspect

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipelines.config import CONFIG_DIR, compose, flatten, is_secret, to_container
from pipelines.errors import ConfigError
from pipelines.lm import merged_judge_cfg

ENTRY_POINTS = ["cot", "rag", "multihop", "ensemble", "optimize", "evaluate", "review", "judge", "assess", "main"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_composes_offline_by_default(name):
    cfg = compose(name)
    assert cfg.lm.server is not None and cfg.lm.temperature == 0.0  # embedded LM, pinned sampling
    assert cfg.embedder.kind == "local" and cfg.data.name == "sample"
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_hydra_keeps_the_working_directory_and_writes_outside_the_source():
    hydra_cfg = OmegaConf.load(CONFIG_DIR / "config.yaml").hydra
    assert hydra_cfg.job.chdir is False
    assert OmegaConf.to_container(hydra_cfg)["run"]["dir"].startswith("${paths.outputs}")


def test_entry_points_pick_their_program():
    assert compose("cot").program.name == "cot"
    assert compose("rag").program.name == "rag"
    assert compose("optimize").program.name == "rag"
    multihop = compose("multihop").program
    assert (multihop.name, multihop.hops, multihop.k, multihop.max_characters) == ("multihop", 2, 5, 500)
    assert compose("optimize", ["program=multihop", "program.hops=3"]).program.hops == 3
    assert compose("ensemble").program.name == "ensemble" and compose("ensemble").ensemble.reducer == "mbr"


def test_main_runs_rag_with_as_many_passages_as_multihop_reads():
    from pipelines.errors import ConfigError
    from pipelines.steps.pipeline import main_steps, step_config

    assert main_steps(compose("main")) == ["cot", "rag", "optimize"]
    overrides = ["steps=[cot,rag,multihop]", "program.hops=3", "program.k=4"]
    steps = main_steps(compose("main", overrides), overrides)
    assert steps == ["cot", "rag", "multihop", "rag-k12"]
    assert step_config(compose("main", overrides), "rag-k12", overrides).program.k == 12
    assert main_steps(compose("main", [*overrides, "matched_rag=false"]), overrides) == ["cot", "rag", "multihop"]
    with pytest.raises(ConfigError, match=r"unknown steps \['storm'\]"):
        main_steps(compose("main", ["steps=[cot,storm]"]))


@pytest.mark.parametrize("overrides, message", [
    (["steps=[cot,optimize,ensemble]", "ensemble.size=1"], r"^an ensemble needs at least 2 members; ensemble.size=1$"),
    (["steps=[cot,optimize,ensemble]", "ensemble.size=2"], r"mbr cannot choose between 2 members .*select.*merge"),
    (["steps=[optimize,ensemble]", "optimizer.keep_candidates=2"],
     r"ensemble.size=3, but the optimize step keeps 2 candidate programs \(optimizer.keep_candidates=2\)"),
    (["steps=[optimize,gepa,ensemble]", "ensemble.size=6"], r"ensemble.size=6, but the gepa step keeps 5"),
    (["steps=[rag,ensemble]"], "made of the best candidates of an optimize"),
    (["steps=[rag,multihop]", "program.hops=0"], r"^program.hops=0: multihop needs at least 1 hop"),
    (["steps=[cot,gepa]", "gepa_optimizer=gepa", "++optimizer.max_metric_calls=2"], "too few for one reflection"),
])
def test_main_checks_every_steps_config_before_any_lm(store, overrides, message):
    """What a later step would fail on, main's ensemble of its optimize step's candidates included, fails
    before any step runs: with the embedded LM configured, no server is started (the unit guard would
    refuse it) and no run opens."""
    import mlflow

    from pipelines.steps.pipeline import check_main

    with pytest.raises(ConfigError, match=message) as error:
        check_main(compose("main", overrides), overrides)
    assert "\n" not in str(error.value)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.parametrize("overrides, steps", [
    (["steps=[cot,optimize,ensemble]"], ["cot", "optimize", "ensemble"]),
    (["steps=[optimize,ensemble]", "ensemble.size=2", "ensemble.reducer=select"], ["optimize", "ensemble"]),
    (["steps=[rag,multihop]", "program.k=2"], ["rag", "multihop", "rag-k4"]),
])
def test_main_checks_pass_what_can_run(store, overrides, steps):
    from pipelines.steps.pipeline import check_main

    configs = check_main(compose("main", overrides), overrides)
    assert list(configs) == steps and configs[steps[-1]].program.name == steps[-1].split("-")[0]


def test_an_optimize_steps_teacher_it_cannot_use_fails_before_any_lm(store):
    from pipelines.steps.optimize import run_optimize

    cfg = compose("optimize", ["optimizer=gepa_quick", "+optimizer.teacher={model: openai/gpt-4o}"])
    with pytest.raises(ConfigError, match="optimizer=gepa learns from no teacher"):
        run_optimize(cfg)  # the embedded LM would start a server: the unit guard refuses that


@pytest.mark.parametrize("overrides, message", [
    ([], "needs exactly one of ensemble.members"),
    (["ensemble.members=[models:/a/1]", "ensemble.samples_of=models:/a/1"], "got \\['members', 'samples_of'\\]"),
    (["ensemble.members=[models:/a/1]"], "at least 2 members; ensemble.members lists 1"),
    (["ensemble.candidates_of=abc", "ensemble.size=1"], "at least 2 members; ensemble.size=1"),
    (["ensemble.samples_of=models:/a/1", "ensemble.temperature=0"], "temperature > 0"),
    (["ensemble.members=[models:/a/1,models:/a/2]"], "mbr cannot choose between 2 members \\(ensemble.members lists 2"),
    (["ensemble.samples_of=models:/a/1", "ensemble.size=2", "ensemble.similarity=rouge_l"], "mbr cannot choose"),
])
def test_an_ensemble_needs_one_source_and_two_members(overrides, message):
    from pipelines.errors import ConfigError
    from pipelines.steps import members

    with pytest.raises(ConfigError, match=message) as error:
        members.check(compose("ensemble", overrides).ensemble)  # before any model is looked up
    assert "\n" not in str(error.value)


def test_tutorial_preset_is_the_tutorial():
    cfg = compose("optimize", ["experiment=tutorial"])
    assert cfg.lm.model == "openai/gpt-4o-mini" and cfg.lm.api_key_env == "OPENAI_API_KEY"
    assert cfg.lm.server is None
    assert (cfg.embedder.model, cfg.embedder.dimensions) == ("openai/text-embedding-3-small", 512)
    assert (cfg.data.train_size, cfg.data.dev_size, cfg.data.test_size) == (200, 300, 500)
    assert cfg.data.shuffle_seed == 0 and cfg.data.examples_url.startswith("https://")
    assert (cfg.program.k, cfg.program.max_characters) == (5, 6000)
    assert cfg.num_threads == 24 and cfg.optimizer.num_threads == 24
    assert cfg.optimizer.auto == "medium"
    assert (cfg.optimizer.max_bootstrapped_demos, cfg.optimizer.max_labeled_demos) == (2, 2)
    assert cfg.optimizer._target_ == "dspy.MIPROv2" and cfg.optimizer.compile.minibatch_size == 35


def test_smoke_preset_shrinks_the_run():
    default, small = compose("optimize"), compose("optimize", ["experiment=smoke"])
    assert small.data.dev_size < default.data.dev_size
    assert small.data.train_size <= default.data.train_size
    assert small.optimizer.compile.num_trials < default.optimizer.compile.num_trials


def test_overrides_reach_nested_groups():
    cfg = compose("rag", ["lm=openai", "lm.model=openai/llama3", "lm.api_base=http://127.0.0.1:1/v1",
                          "lm.api_key_env=null", "program.k=3"])
    assert cfg.lm.model == "openai/llama3" and cfg.lm.api_key_env is None and cfg.program.k == 3


def test_judge_defaults_to_the_task_lm_and_takes_overrides():
    cfg = compose("cot", ["lm=openai"])
    assert merged_judge_cfg(cfg) is cfg.lm
    judged = merged_judge_cfg(compose("cot", ["+judge.model=openai/gpt-4o", "+judge.adapter=chat"]))
    assert judged.model == "openai/gpt-4o" and judged.adapter == "chat"
    assert judged.temperature == compose("cot").lm.temperature  # everything else comes from lm
    embedded = merged_judge_cfg(compose("cot"))  # lm=local: the same model, its verdicts kept short
    assert embedded.model == compose("cot").lm.model and embedded.max_tokens == 192


def test_tracking_uri_follows_the_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert compose("cot").tracking.uri.endswith("/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/elsewhere.db")
    assert compose("cot").tracking.uri == "sqlite:////tmp/elsewhere.db"


def test_secrets_are_dropped_from_logged_config():
    cfg = OmegaConf.create({"lm": {"api_key": "sk-x", "api_key_env": "OPENAI_API_KEY", "model": "m"},
                            "token": "t", "nested": [{"password": "p", "ok": 1}]})
    flat = flatten(to_container(cfg))
    assert flat == {"lm.api_key_env": "OPENAI_API_KEY", "lm.model": "m", "nested": [{"ok": 1}]}
    assert is_secret("API_KEY") and not is_secret("api_key_env")


# overrides -> (optimizer class, auto, GEPA metric-call budget or MIPROv2 trials)
PRESETS = [([], ("MIPROv2", None, 3)), (["optimizer=mipro"], ("MIPROv2", "medium", None)),
           (["optimizer=gepa"], ("GEPA", "light", None)), (["optimizer=gepa_quick"], ("GEPA", None, 16)),
           (["experiment=smoke"], ("MIPROv2", None, 2)),
           (["experiment=smoke", "optimizer=gepa_quick"], ("GEPA", None, 16)),
           (["experiment=tutorial"], ("MIPROv2", "medium", None)),
           (["experiment=tutorial", "optimizer=gepa"], ("GEPA", "light", None)),
           (["optimizer=gepa", "experiment=tutorial"], ("GEPA", "light", None))]


@pytest.mark.parametrize("overrides, expected", PRESETS)
def test_every_optimizer_preset_composes_and_builds(overrides, expected):
    import dspy

    from pipelines.evaluation.feedback import FeedbackF1
    from pipelines.optimizers import build_optimizer, compile_kwargs, reflective

    cfg = compose("optimize", overrides)
    lm = dspy.LM("openai/fake")
    gepa = reflective(cfg.optimizer)
    with dspy.context(lm=lm):
        optimizer = build_optimizer(cfg.optimizer, FeedbackF1(lm) if gepa else lambda *a: 0.0,
                                    **({"reflection_lm": lm} if gepa else {}))
    budget = optimizer.max_metric_calls if gepa else compile_kwargs(cfg.optimizer).get("num_trials")
    assert (type(optimizer).__name__, optimizer.auto, budget) == expected
    assert optimizer.num_threads == cfg.num_threads
    # compile() takes every compile key; the valset and minibatch are the optimizer's own business.
    assert set(compile_kwargs(cfg.optimizer)) <= set(inspect.signature(type(optimizer).compile).parameters)


def test_tutorial_gepa_reflects_with_a_stronger_lm_others_with_the_task_lm():
    from pipelines.lm import merged_reflection_cfg

    cfg = compose("optimize", ["experiment=tutorial", "optimizer=gepa"])
    reflection = merged_reflection_cfg(cfg)
    assert reflection.model == "openai/gpt-4o" and reflection.api_key_env == "OPENAI_API_KEY"
    assert cfg.lm.model == "openai/gpt-4o-mini" and cfg.data.train_size == 200 and cfg.num_threads == 24
    quick = compose("optimize", ["optimizer=gepa_quick"])
    assert merged_reflection_cfg(quick) is quick.lm


def test_main_runs_gepa_as_the_optimize_step_with_its_preset():
    from pipelines.steps.pipeline import step_config

    for overrides, auto in (([], None), (["experiment=tutorial"], "light")):
        step = step_config(compose("main", overrides), "gepa", overrides)
        assert step.program.name == "rag" and step.optimizer.name == "gepa" and step.optimizer.auto == auto


@pytest.mark.parametrize("override, message", [("lm.max_tokens=lots", "lm.max_tokens"),
                                               ("data.dev_size=3.5", "data.dev_size"),
                                               ("tracking.log_traces=maybe", "tracking.log_traces")])
def test_schema_refuses_bad_values_and_unknown_keys_at_composition(override, message):
    with pytest.raises(ConfigCompositionException, match=message):
        compose("rag", [override])


def test_schema_converts_values_once():
    cfg = compose("rag", ["program.k=3", "data.dev_size=4", "scoring.confidence=0.9", "lm.cache=false"])
    assert (cfg.program.k, cfg.data.dev_size, cfg.scoring.confidence, cfg.lm.cache) == (3, 4, 0.9, False)
    assert compose("rag", ["experiment=tutorial"]).lm.server is None  # hosted LMs have no server block


@pytest.mark.parametrize("preset, teaching", [("mipro", "settings"), ("bootstrap", "settings"),
                                              ("finetune", "program"), ("gepa", None)])
def test_a_teacher_reaches_the_optimizers_that_bootstrap_and_only_those(preset, teaching):
    from pipelines import optimizers
    from pipelines.lm import merged_teacher_cfg

    cfg = compose("optimize", [f"optimizer={preset}"])
    assert merged_teacher_cfg(cfg) is None and optimizers.teaching(cfg.optimizer) == teaching
    if teaching:
        taught = compose("optimize", [f"optimizer={preset}", "optimizer.teacher={model: openai/gpt-4o}"])
        teacher = merged_teacher_cfg(taught)
        assert teacher.model == "openai/gpt-4o" and teacher.adapter == taught.lm.adapter  # laid over lm


def test_main_runs_a_finetune_step_on_the_optimize_entry_point_with_its_preset():
    from pipelines.steps.pipeline import main_steps, step_config

    for overrides, preset in (([], "finetune_quick"), (["experiment=tutorial"], "finetune")):
        main = compose("main", [*overrides, "steps=[cot,rag,optimize,finetune]"])
        assert main_steps(main, overrides) == ["cot", "rag", "optimize", "finetune"]
        step = step_config(main, "finetune", overrides)
        rank = 8 if preset == "finetune_quick" else 16
        assert step.optimizer.name == "finetune" and step.optimizer.finetune.r == rank


def test_a_finetune_needs_the_embedded_model_and_a_base_that_exists(tmp_path):
    from pipelines.optimizers import finetune_provider

    cfg = compose("optimize", ["optimizer=finetune_quick"])
    provider = finetune_provider(cfg.optimizer, cfg.lm, tmp_path)
    assert provider.base.name.endswith(".gguf") and provider.settings.target_modules == ("v_proj", "o_proj")
    remote = compose("optimize", ["optimizer=finetune_quick", "lm=openai"])
    with pytest.raises(ConfigError, match="use lm=local"):
        finetune_provider(remote.optimizer, remote.lm, tmp_path)
    missing = compose("optimize", ["optimizer=finetune_quick", f"optimizer.finetune.base_model={tmp_path}/nope"])
    with pytest.raises(ConfigError, match="no such file"):
        finetune_provider(missing.optimizer, missing.lm, tmp_path)


def test_better_together_builds_its_prompt_and_weight_optimizers():
    from pipelines.optimizers import build_optimizer, nested

    cfg = compose("optimize", ["optimizer=better_together"])
    built = {key: build_optimizer(sub, lambda *a: 0.0) for key, sub in nested(cfg.optimizer).items()}
    together = build_optimizer(cfg.optimizer, lambda *a: 0.0, **built)
    assert {k: type(v).__name__ for k, v in together.optimizers.items()} == {"p": "BootstrapFewShot",
                                                                             "w": "BootstrapFinetune"}
    assert built["w"].num_threads == cfg.num_threads and cfg.optimizer.compile.strategy == "p -> w -> p"


def test_at_least_turns_a_score_into_pass_or_fail():
    from pipelines.optimizers import AtLeast

    metric = AtLeast(lambda example, prediction, trace=None: prediction, 0.3)
    assert [metric(None, s, trace=[]) for s in (0.0, 0.29, 0.3, 0.9)] == [False, False, True, True]
