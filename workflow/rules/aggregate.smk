# Aggregation on the submit host: the ablation table (CSV, Markdown, LaTeX), the paper comparison,
# plots and report.html under results/<experiment>/, logged to MLflow as an `aggregate` run. It
# reruns when any stage result or the pipeline config (launcher settings aside) changed.

TABLES = f"{EXP_DIR}/tables"
PLOTS = f"{EXP_DIR}/plots"


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
        # report(): what `snakemake --report report.html` shows, with captions from workflow/report/
        table_md=report(f"{TABLES}/ablation.md", caption="../report/ablation.rst", category="Tables"),
        table_csv=report(f"{TABLES}/ablation.csv", caption="../report/ablation.rst", category="Tables"),
        table_tex=f"{TABLES}/ablation.tex",
        accuracy=report(f"{PLOTS}/accuracy.png", caption="../report/accuracy.rst", category="Plots"),
        curves=report(f"{PLOTS}/score_curves.png", caption="../report/score_curves.rst", category="Plots"),
        histograms=report(f"{PLOTS}/score_histograms.png", caption="../report/score_histograms.rst",
                          category="Plots"),
        knn_curves=report(f"{PLOTS}/knn_curves.png", caption="../report/knn_curves.rst", category="Plots"),
        html=report(f"{EXP_DIR}/report.html", caption="../report/report_html.rst", category="Report"),
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
