"""The closed loop: training rounds (collect -> generate -> label -> dataset -> train -> evaluate
-> decide), their scheduler, the demo, and `prefloop up` (the service plus the scheduler).

The top layer below cli.py: it composes the store, the judges (feedback/), the trainers
(training/) and the web service (app/ with the labeling UI). runner.py drives a round, stages/
holds one module per stage, decision.py the promotion gate, config.py the round config,
schedule.py the scheduler, demo.py the demo, commands.py the commands (docs/rounds.md).

    prefloop round run --algo dpo --config loop/configs/demo.toml
"""
