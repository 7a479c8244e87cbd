"""ClientApp: either echoes zeros of the model's shapes (train=0, like fedgradnorm's ``--no-train``
nodes) or runs the round-overhead benchmark's client step on this node's data (train=1).

torch is imported only when training: the echo needs numpy alone, so a no-training round does not
pay for importing torch in every ClientApp process.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    if not int(context.run_config["train"]):
        zeros = ArrayRecord({k: Array(np.zeros(a.shape, dtype=np.float32)) for k, a in arrays.items()})
        return Message(RecordDict({"arrays": zeros, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
    return _train(msg, arrays, context)


def _train(msg: Message, arrays: ArrayRecord, context: Context) -> Message:
    import torch
    from torch import nn

    from .task import Network2, load_data, local_round, minibatches

    cfg = context.run_config
    torch.set_num_threads(1)  # as fedgradnorm's edge nodes (--torch-threads 1)
    x, y, x_test, y_test, outputs = load_data(str(context.node_config["data-path"]))
    shared = Network2()
    shared.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    head = nn.Linear(256, outputs)
    if "head" in context.state:  # the personal head lives on in the node's context
        head.load_state_dict(context.state["head"].to_torch_state_dict())  # type: ignore[union-attr]
    server_round = int(msg.content["config"]["server-round"])  # type: ignore[index]
    seed = int(context.node_config["partition-id"]) * 100_003 + server_round
    loss, test_loss = local_round(
        shared,
        head,
        minibatches(x, y, int(cfg["batch-size"]), seed),
        int(cfg["tau-h"]),
        int(cfg["tau-omega"]),
        float(cfg["lr"]),
        x_test,
        y_test,
    )
    context.state["head"] = ArrayRecord(head.state_dict())
    content = RecordDict(
        {
            "arrays": ArrayRecord(shared.state_dict()),
            "metrics": MetricRecord({"num-examples": len(x), "train-loss": loss, "test-loss": test_loss}),
        }
    )
    return Message(content, reply_to=msg)
