"""In-process measurements of model_core (run as `python -m model_core.tools.<name>`): what needs the model's
own code rather than a server; the HTTP benchmarks in benchmarks/ call them as subprocesses where they need one."""
