"""Stage ``deploy``: the canary on the serving backend, then promotion or rollback.

* :mod:`pipeline.stages.deploy.stage` -- the stage: control loop, promote/roll back, entry points
* :mod:`pipeline.stages.deploy.replay` -- the replay client (golden audio through the router)
* :mod:`pipeline.stages.deploy.analysis` -- one interval's per-version measurements and checks
* :mod:`pipeline.stages.deploy.rollback` -- back to the previous production version (serving + alias)
"""

from pipeline.stages.deploy.rollback import rollback
from pipeline.stages.deploy.stage import deploy_model, deploy_registered

__all__ = ["deploy_model", "deploy_registered", "rollback"]
