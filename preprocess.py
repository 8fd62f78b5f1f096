"""Stage 4: fit encoders and scaler on a sample of train, build histories, write processed/.

    python preprocess.py --data data --preprocessors preprocessors

Reads   --data/cleaned/ (from parse_ua_strings.py)
Writes  --preprocessors/ (default preprocessors): encoders.json, scaler.json, fit.json, and fitted_for.json
          naming the processed/ they are for; replaced only when it is new, empty, or holds nothing but
          those, and not while another processed/ still records them (else refused, untouched)
        --data/processed/ (default data/processed), atomically, with _stage.json:
          timeline (default): timelines/bucket=NNNNN/ (each customer's actions once) and
                              <split>/examples/dt=YYYY-MM-DD/ (with each example's window into them)
          compact (--layout compact): <split>/examples/dt=YYYY-MM-DD/ and <split>/histories/dt=YYYY-MM-DD/
          wide (--layout wide): <split>/dt=YYYY-MM-DD/ with fixed-length, 0-padded actions
"""

from recpipe import preprocess, stages
from recpipe.cli import entrypoint


@entrypoint
def main(argv=None):
    args = stages.BY_NAME["processed"].parse_args(argv, __doc__)
    preprocess.run_stage(args)


if __name__ == "__main__":
    main()
