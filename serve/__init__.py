"""serve stage: trained probes inside the model's own forward pass (docs/SERVING.md).

    from probecache.serve import ProbedModel
    pm = ProbedModel.from_runs({"sentiment": "runs/<id>"})
    pm.classify(["a quiet masterpiece"])
    pm.generate(["..."], max_new_tokens=32, refuse_on={"toxicity": None})

Modules: ``hooks`` (which module yields which hidden state), ``loading`` (run folders and the checks that let
runs share a pass), ``probed`` (ProbedModel), ``policy`` (refusals), ``http`` (the JSON endpoint: limits, queue,
503s), ``limits`` (request bounds without torch), ``errors`` (ServeError, PromptTooLong).
Names are imported lazily: ``import probecache.serve.hooks`` does not pull in transformers' generation code.
"""

from importlib import import_module

_EXPORTS = {
    "ProbedModel": "probecache.serve.probed",
    "ProbedOutput": "probecache.serve.probed",
    "ServedRun": "probecache.serve.loading",
    "load_run": "probecache.serve.loading",
    "DEFAULT_REFUSAL": "probecache.serve.policy",
    "make_server": "probecache.serve.http",
    "ServeError": "probecache.serve.errors",
    "PromptTooLong": "probecache.serve.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'probecache.serve' has no attribute {name!r}")
