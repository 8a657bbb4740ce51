# The ftcl pipeline: every ablation row x seed is pretrained, evaluated (linear probe, kNN, and
# detection when it is in `stages`), tracked in MLflow and aggregated into tables and plots.
#   snakemake -c2                                    the demo (config/config.yaml)
#   snakemake -c2 --configfile config/paper/X.yaml   another pipeline config (replaces the demo's)
#   snakemake --report report.html                  Snakemake's report of the tables and plots
# Rules call the `ftcl` command line (`ftcl stage`, ftcl/orchestrate/), so every stage can be rerun by
# hand; docs/ARCHITECTURE.md describes the config and the run folders.
from snakemake.utils import min_version

min_version("9.0")

# A --configfile replaces the demo config instead of being merged into it.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"

# The config is checked once, by ftcl/pipeline/ in workflow/rules/common.smk, against the schema
# workflow/schemas/config.schema.yaml links to, after values Snakemake hands over as text (a profile's
# config:) get their types back, with messages that name the row and the key.


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/stages.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    default_target: True
    input:
        rules.aggregate.output,
