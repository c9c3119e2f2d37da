"""Launcher plumbing that needs no cluster: task shares, SLURM environment defaults, script generation."""

from __future__ import annotations

import pytest
from probecache.extract.errors import ExtractError
from probecache.extract.launchers import LaunchConfig, _ranges, cli_args, task_shards
from probecache.extract.run import extract


def test_task_shares_cover_every_shard_whatever_n():
    pending = [0, 1, 2, 5, 6, 9]
    for n in (1, 2, 3, 7):
        shares = [task_shards(pending, k, n) for k in range(n)]
        assert sorted(s for share in shares for s in share) == pending  # each once, none missing
    assert task_shards(pending, None, None) == pending


def test_slurm_array_environment_is_the_default_task(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert LaunchConfig().resolved_task() == (3, 4)
    assert LaunchConfig(task_index=1, num_tasks=2).resolved_task() == (1, 2)  # options win
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    with pytest.raises(ExtractError, match="--num-tasks"):
        LaunchConfig().resolved_task()


@pytest.mark.parametrize("launch,match", [
    (LaunchConfig(executor="mpi"), "--executor"),
    (LaunchConfig(task_index=2, num_tasks=2), "task index < num tasks"),
    (LaunchConfig(workers=0), "--workers"),
])
def test_bad_launch_options(launch, match):
    with pytest.raises(ExtractError, match=match):
        launch.validate()


def test_array_ranges():
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert _ranges([4]) == "4"


def test_task_index_runs_only_its_share_and_the_rest_resume(extract_config):
    config = extract_config()
    first = extract(config, LaunchConfig(task_index=1, num_tasks=2))
    from probecache import open_store

    assert open_store(first.store_path).layout.committed_shards() == {1, 3}
    rest = extract(config)
    assert rest.shards_run == 2 and open_store(rest.store_path).summary()["complete"]


def test_dry_run_prints_a_script_that_reproduces_the_store_and_writes_nothing(extract_config, capsys, tmp_path):
    config = extract_config(root=str(tmp_path / "never-created"))
    result = extract(config, LaunchConfig(executor="slurm", dry_run=True, gpus=1, partition="gpu", max_parallel=3))
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-3%3" in script and "#SBATCH --gres=gpu:1" in script and "--partition=gpu" in script
    assert "--requeue" in script and "--signal=B:USR1@120" in script and '--task-index "$SLURM_ARRAY_TASK_ID"' in script
    assert not (tmp_path / "never-created").exists()
    # the task command line rebuilds exactly this config: same store id when the task prepares it
    args = cli_args(config)
    assert "--shard-size" in args and str(config.shard_size) in args and "--no-logits" in args
    assert result.store_id in str(result.store_path)


def test_the_task_command_line_maps_to_the_same_store(extract_config, tmp_path):
    from typer.testing import CliRunner

    from probecache.cli import app

    config = extract_config(limit=20, max_tokens=40, prompt_format="chat", logits=True, splits=("train", "test"))
    original = extract(config, LaunchConfig(executor="slurm", dry_run=True))
    result = CliRunner().invoke(app, ["extract", *cli_args(config), "--executor", "slurm", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"store: {original.store_path}"
