"""The seven stages of a round, one module each: collect, generate, label, dataset, train,
evaluate, decide. Each module's `run(ctx, rnd, config)` computes (the heavy parts as Ray tasks)
and returns a `StageResult` whose `write` is the stage's one store transaction, which
loop/runner.py commits together with the round's advance.

    python -c "from loop.stages import collect; help(collect.run)"
"""
