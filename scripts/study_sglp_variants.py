#!/usr/bin/env python3
"""Study which SGLP decision wins on a trained model: run `sglp-engine compare --criteria sglp` once per
variant of the decision (features, k rule, allocation, selection, shortlist, scoring sequences) over a sweep
of budgets, next to the baselines, and print one table of held-out perplexities (rows: variants, columns:
budgets) with each variant's worst ratio to the best baseline (shortgpt, angular, mpruner, random median)
and to the SLEB reference.

    python3 scripts/study_sglp_variants.py [--model tests/fixtures/trained_llama] [--remove 1..6]

Only the Python standard library is needed; the engine does the work (build it with cargo build --release).
"""
import argparse
import json
import os
import subprocess
import tempfile

VARIANTS = {
    # name: extra compare flags for the sglp criterion
    "paper-chain+gradnorm (old default)": ["--features", "colsum", "--allocation", "proportional",
                                           "--selection", "gradnorm"],
    "rows+auto+proportional+gradnorm": ["--features", "rows", "--allocation", "proportional",
                                        "--selection", "gradnorm"],
    "rows+auto+adaptive+gradnorm": ["--features", "rows", "--allocation", "adaptive", "--selection", "gradnorm"],
    "colsum+auto+proportional+loss(all)": ["--features", "colsum", "--allocation", "proportional",
                                           "--selection", "loss", "--shortlist", "0"],
    "rows+auto+adaptive+loss(shortlist 1)": ["--selection", "loss", "--shortlist", "1"],
    "rows+auto+adaptive+loss(shortlist 2)": ["--selection", "loss", "--shortlist", "2"],
    "rows+auto+adaptive+loss(shortlist 2, 4 seqs)": ["--selection", "loss", "--shortlist", "2",
                                                     "--score-sequences", "4"],
    "rows+auto+adaptive+loss(shortlist 2, 8 seqs)": ["--selection", "loss", "--shortlist", "2",
                                                     "--score-sequences", "8"],
    "rows+k4+adaptive+loss(shortlist 2)": ["--k", "4", "--selection", "loss", "--shortlist", "2"],
    "rows+k4+proportional+loss(shortlist 2)": ["--k", "4", "--allocation", "proportional",
                                               "--selection", "loss", "--shortlist", "2"],
    "rows+elbow+adaptive+loss(shortlist 2)": ["--k", "elbow", "--selection", "loss", "--shortlist", "2"],
    "rows+elbow+adaptive+loss(shortlist 1)": ["--k", "elbow", "--selection", "loss", "--shortlist", "1"],
    "rows+elbow+proportional+gradnorm": ["--k", "elbow", "--allocation", "proportional", "--selection",
                                         "gradnorm"],
    "rows+auto+open+loss(sl 2 by loss)": ["--allocation", "open", "--selection", "loss", "--shortlist", "2",
                                          "--shortlist-by", "loss"],
    "rows+auto+open+loss(sl 1 by loss)": ["--allocation", "open", "--selection", "loss", "--shortlist", "1",
                                          "--shortlist-by", "loss"],
    "rows+auto+open+loss(sl 2 by influence)": ["--allocation", "open", "--selection", "loss", "--shortlist",
                                               "2", "--shortlist-by", "influence"],
    "rows+elbow+open+loss(sl 2 by loss)": ["--k", "elbow", "--allocation", "open", "--selection", "loss",
                                           "--shortlist", "2", "--shortlist-by", "loss"],
    "rows+auto+adaptive+loss(sl 2 by loss)": ["--selection", "loss", "--shortlist", "2", "--shortlist-by",
                                              "loss"],
    "rows+auto+open+loss(sl 2 by loss, 4 seqs)": ["--allocation", "open", "--selection", "loss", "--shortlist",
                                                  "2", "--shortlist-by", "loss", "--score-sequences", "4"],
    "rows+auto+open+loss(sl 2 by loss, 8 seqs)": ["--allocation", "open", "--selection", "loss", "--shortlist",
                                                  "2", "--shortlist-by", "loss", "--score-sequences", "8"],
    "rows+auto+open+loss(all)": ["--allocation", "open", "--selection", "loss", "--shortlist", "0"],
    "k1+open+loss(sl 1 by loss) = rank by single-removal loss": ["--k", "1", "--allocation", "open",
                                                                  "--selection", "loss", "--shortlist", "1",
                                                                  "--shortlist-by", "loss"],
    "rows+elbow+open+loss(sl 1 by loss)": ["--k", "elbow", "--allocation", "open", "--selection", "loss",
                                           "--shortlist", "1", "--shortlist-by", "loss"],
    "rows+elbow+open+loss(sl 2 by influence)": ["--k", "elbow", "--allocation", "open", "--selection", "loss",
                                                "--shortlist", "2", "--shortlist-by", "influence"],
    "rows+elbow+open+loss(sl 1 by influence)": ["--k", "elbow", "--allocation", "open", "--selection", "loss",
                                                "--shortlist", "1", "--shortlist-by", "influence"],
    "rows+elbow+open+loss(sl 2 by loss, 16 seqs)": ["--k", "elbow", "--allocation", "open", "--selection",
                                                    "loss", "--shortlist", "2", "--shortlist-by", "loss",
                                                    "--score-sequences", "16"],
    "colsum+auto+adaptive+loss(shortlist 2)": ["--features", "colsum", "--selection", "loss",
                                               "--shortlist", "2"],
}


def run(engine, model, calib, held, remove, criteria, extra, seeds):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "c.json")
        cmd = [engine, "compare", "--model", model, "--tokens", calib, "--eval-tokens", held,
               "--remove", remove, "--criteria", criteria, "--seeds", str(seeds), "-o", out] + extra
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.load(open(out))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default=os.path.join(here, "..", "target", "release", "sglp-engine"))
    ap.add_argument("--model", default=os.path.join(here, "..", "tests", "fixtures", "trained_llama"))
    ap.add_argument("--calib", default=None)
    ap.add_argument("--held", default=None)
    ap.add_argument("--remove", default="1..6")
    ap.add_argument("--seeds", type=int, default=9)
    ap.add_argument("--only", nargs="*", help="variant names (substrings) to run")
    a = ap.parse_args()
    calib = a.calib or os.path.join(a.model, "calib.npy")
    held = a.held or os.path.join(a.model, "heldout.npy")
    base = run(a.engine, a.model, calib, held, a.remove, "shortgpt,angular,mpruner,random,sleb,sglp-paper", [],
               a.seeds)
    budgets = base["budgets"]
    curves = {c["criterion"]: [p["value"] for p in c["points"]] for c in base["curves"]}
    best_base = [min(curves[c][i] for c in ("shortgpt", "angular", "mpruner", "random"))
                 for i in range(len(budgets))]
    w = max(len(k) for k in VARIANTS) + 2
    print(f"unpruned {base['baseline']['value']:.4f}")
    print(f"{'':<{w}}" + "".join(f"{n:>9}" for n in budgets) + "   worst/base  worst/sleb   decide s")
    for name in ("shortgpt", "angular", "mpruner", "random", "sleb", "sglp-paper"):
        print(f"{name:<{w}}" + "".join(f"{v:>9.3f}" for v in curves[name]))
    for name, extra in VARIANTS.items():
        if a.only and not any(o in name for o in a.only):
            continue
        r = run(a.engine, a.model, calib, held, a.remove, "sglp", extra, a.seeds)
        c = r["curves"][0]
        ppl = [p["value"] for p in c["points"]]
        wb = max(p / b for p, b in zip(ppl, best_base))
        ws = max(p / s for p, s in zip(ppl, curves["sleb"]))
        print(f"{name:<{w}}" + "".join(f"{v:>9.3f}" for v in ppl) + f"   {wb:>10.4f}  {ws:>10.4f}   {c['decide_s']:>8.2f}",
              flush=True)


if __name__ == "__main__":
    main()
