"""Stage ``deploy``: the canary on the serving backend, then promotion or rollback."""

from pipeline.stages.deploy.stage import deploy_registered

__all__ = ["deploy_registered"]
