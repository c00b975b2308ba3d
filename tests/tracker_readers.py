"""Read back what the trackers wrote, each with its own library: TensorBoard's event accumulator,
W&B's record protobufs over its offline run files, MLflow's client against the store."""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path


def tensorboard_scalars(logdir: Path) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """({scalar tag: steps, in file order}, {text tag: steps}) over every event file under logdir."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer(size_guidance={"scalars": 0, "tensors": 0})
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    scalars: dict[str, list[int]] = defaultdict(list)
    texts: dict[str, list[int]] = defaultdict(list)
    for run in multiplexer.Runs():
        accumulator = multiplexer.GetAccumulator(run)
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] += [event.step for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["tensors"]:
            texts[tag] += [event.step for event in accumulator.Tensors(tag)]
    return dict(scalars), dict(texts)


_BLOCK, _HEADER, _FULL, _LAST = 32768, 7, 1, 4


def wandb_records(path: Path):
    """The records of one offline run file (`run-ID.wandb`): LevelDB's log format (32 KiB blocks of
    7-byte-headed fragments) after W&B's 7-byte file header, each record one `Record` protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, fragments = _HEADER, []
    while position + _HEADER <= len(data):
        if _BLOCK - position % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            position += _BLOCK - position % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        fragments.append(data[position + _HEADER : position + _HEADER + length])
        position += _HEADER + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(fragments))
            fragments = []
            yield record
        elif kind == 0 and length == 0:
            fragments = []


def wandb_offline(run_dir: Path, run_id: str) -> tuple[list[dict], dict]:
    """(history rows in order over every offline run of `run_id`, the config keys set)."""
    history, config = [], {}
    for file in sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
            elif kind == "run":
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return history, config


def mlflow_run(tracking_uri: str, run_id: str):
    """(run, {metric: steps}, artifact paths) from MLflow's client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    steps = {key: [m.step for m in client.get_metric_history(run_id, key)] for key in run.data.metrics}
    artifacts = [a.path for a in client.list_artifacts(run_id)]
    artifacts += [a.path for a in client.list_artifacts(run_id, "sample_tables")]
    return run, steps, artifacts, client
