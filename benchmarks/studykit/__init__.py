"""Study v2 and the continuation study, run by ``benchmarks/study.py``.

design: arms, comparisons, metrics and presets; stats: paired differences, t-intervals, the decision rule;
evaluate: the frozen-representation metrics; commands: each arm's pre-training; jobs: records and the jobs
claimed across processes; report: the Markdown report and plots; pilot: study v2's pilot; continuation: the
continuation study's pilot; cli: the command line.
"""
