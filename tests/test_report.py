"""The run's reports: readable plots, one self-contained HTML file, the ablation comparison."""

import base64
import re

import matplotlib.image

from pipeline.report import write_ablation_report, write_report

RESULTS = {
    "bm25": {"bm25": {"ndcg@10": 0.5386, "mrr@10": 0.4412, "recall@100": 1.0}},
    "initial": {"dual-encoder": {"ndcg@10": 0.0476, "mrr@10": 0.0375, "recall@100": 0.28}},
    "teacher": {"cross-encoder (re-rank BM25 top 100)": {"ndcg@10": 0.3796, "mrr@10": 0.2494, "recall@100": 1.0}},
    "distill": {"dual-encoder": {"ndcg@10": 0.4864, "mrr@10": 0.3972, "recall@100": 0.97},
                "colbert (re-rank DE top 100)": {"ndcg@10": 0.5559, "mrr@10": 0.4265, "recall@100": 0.97}},
}


def test_the_report_is_markdown_and_one_html_file_with_its_plots_inside(tmp_path):
    stage = tmp_path / "distill-0a1b2c3d"
    stage.mkdir()
    (stage / "train_log.jsonl").write_text('{"step": 1, "epoch": 0, "lr": 0.1, "skipped_steps": 0, "loss": 2.0, "de": 1.0}\n'
                                           '{"step": 2, "epoch": 0, "lr": 0.1, "skipped_steps": 0, "loss": 1.5, "de": 0.8}\n')
    write_report(tmp_path, RESULTS, {"distill": stage})
    markdown = (tmp_path / "report.md").read_text()
    assert "| distill / colbert (re-rank DE top 100) | 0.5559 | 0.4265 | 0.9700 |" in markdown
    assert "![metrics.png](metrics.png)" in markdown and "![loss-distill.png](loss-distill.png)" in markdown
    page = (tmp_path / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(i)[:8] for i in images] == [b"\x89PNG\r\n\x1a\n"] * 2  # no file beside it is needed
    assert '<td class="n">0.5559</td>' in page
    height, width, _ = matplotlib.image.imread(tmp_path / "metrics.png").shape
    assert width > height  # one panel per metric side by side, one row per (stage, model)


def test_the_ablation_report_gives_each_variant_its_difference_to_the_full_run(tmp_path):
    variant = {**RESULTS, "distill": {"dual-encoder": {"ndcg@10": 0.3245, "mrr@10": 0.2693, "recall@100": 0.855},
                                      "colbert (re-rank DE top 100)": {"ndcg@10": 0.5, "mrr@10": 0.4, "recall@100": 0.9}}}
    table = write_ablation_report(tmp_path, {"full": RESULTS, "contrastive-only": variant},
                                  {"contrastive-only": ["ce", "col"]}, "distill")
    assert "| contrastive-only / dual-encoder | 0.3245 | -0.1619 | 0.2693 | 0.8550 |" in table
    assert "| full / dual-encoder | 0.4864 | - |" in table
    assert "contrastive-only: ce, col off" in (tmp_path / "ablation.md").read_text()
    assert (tmp_path / "ablation.png").exists() and "data:image/png;base64," in (tmp_path / "ablation.html").read_text()
