"""Placeholder until the study runner lands."""


def cmd_run(args):
    raise NotImplementedError("the study runner is not built yet (issue 6)")


cmd_status = cmd_report = cmd_run
