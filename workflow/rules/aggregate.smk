# Aggregation on the submit host: the ablation table (CSV, Markdown, LaTeX), the paper comparison,
# plots and report.html under results/<experiment>/, logged to MLflow as an `aggregate` run. It
# reruns when any stage result or the pipeline config (launcher settings aside) changed.

AGGREGATE_OUTPUTS = multiext(f"{EXP_DIR}/tables/ablation", ".csv", ".md", ".tex")


rule pipeline_config:
    output:
        PIPELINE_CONFIG,
    params:
        digest=pipeline.digest(PIPE.aggregation_text()),
        text=Unrecorded(PIPE.aggregation_text()),
    log:
        f"{EXP_DIR}/logs/pipeline_config.log",
    conda:
        "../envs/ftcl.yaml"
    shell:
        "printf '%s' {params.text:q} > {output:q} && echo 'wrote {output}' > {log:q}"


rule aggregate:
    input:
        pipeline=PIPELINE_CONFIG,
        results=requested_results(),
    output:
        AGGREGATE_OUTPUTS,
    log:
        f"{EXP_DIR}/logs/aggregate.log",
    params:
        ftcl=Unrecorded(FTCL),
    conda:
        "../envs/ftcl.yaml"
    shell:
        "{params.ftcl:q} aggregate --configfile {input.pipeline:q} > {log:q} 2>&1"


localrules:
    pipeline_config,
    aggregate,


onsuccess:
    table = Path(f"{EXP_DIR}/tables/ablation.md")
    if table.is_file():
        print(f"\n{table}:\n{table.read_text()}")
