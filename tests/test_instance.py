"""The default profile's instance file: written when missing or an earlier default, kept when
edited, and loadable by Dagster with the settings it claims."""

from __future__ import annotations

import dagster as dg

from orchestration.instance import DEFAULT_INSTANCE_YAML, write_default_instance


def test_the_default_instance_is_written_upgraded_or_kept(tmp_path):
    path = write_default_instance(tmp_path / "new")
    assert path.read_text() == DEFAULT_INSTANCE_YAML
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # shipped before
    assert write_default_instance(earlier).read_text() == DEFAULT_INSTANCE_YAML
    edited = tmp_path / "edited"
    edited.mkdir()
    mine = DEFAULT_INSTANCE_YAML.replace("max_concurrent_runs: 2", "max_concurrent_runs: 8")
    (edited / "dagster.yaml").write_text(mine)
    assert write_default_instance(edited).read_text() == mine
    assert not list(tmp_path.rglob("*.partial"))


def test_dagster_reads_the_default_instance_as_written(tmp_path):
    write_default_instance(tmp_path)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        coordinator = instance.run_coordinator
        assert coordinator._dequeue_interval_seconds == 1  # no public getter
        # What the run queue daemon reads for its limits.
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 2
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
