"""The best model of a search as a version of a registered model named after the search.

The exported pipeline stays where it is (the parent run's `best/pipeline`); the version points at
it (`runs:/PARENT/best/pipeline`) and is linked to the parent run, so the UI's Models page leads
back to the search. Tracking stores without a registry (MLflow's registry needs a database-backed
or file store; some hosted servers have none) get one line instead: the model is still there.
"""

from __future__ import annotations

from typing import Optional

from paceray.protocol.keys import MODEL_VERSION_TAG as VERSION_TAG


def register_best(client, parent: str, name: str, artifact_path: str, tags: dict[str, str]) -> Optional[str]:
    """Register `artifact_path` of run `parent` as a new version of model `name`; returns
    "NAME/VERSION", or None (and says why in one line) where the store has no registry."""
    from mlflow.exceptions import MlflowException

    done = client.get_run(parent).data.tags.get(VERSION_TAG)
    if done:
        return done
    try:
        try:
            client.get_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_registered_model(name, description=f"Best models of the paceray search {name!r}, one "
                                                             f"version per search run.")
        version = client.create_model_version(name, f"runs:/{parent}/{artifact_path}", run_id=parent,
                                              tags={k: str(v) for k, v in tags.items()},
                                              await_creation_for=0)  # a runs:/ source is READY at once
    except MlflowException as e:
        print(f"warning: the tracking store has no model registry here ({e.error_code}: {str(e).splitlines()[0][:160]}); "
              f"the best model stays at runs:/{parent}/{artifact_path}", flush=True)
        return None
    where = f"{name}/{version.version}"
    client.set_tag(parent, VERSION_TAG, where)
    return where
