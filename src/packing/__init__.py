"""Runs trained together (`pack=true`): which runs of a sweep pack and how a pack travels as one
job (`jobs`), what keeps a run out of a pack (`refusal`), each run's own state in a pack (`runs`),
the pack as one LightningModule (`module`) and its training (`train`). docs/packing.md."""
