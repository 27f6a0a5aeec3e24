//! The pointwise (1×1) conv for inference: a GEMM per block of spatial columns with its
//! epilogue (bias, ReLU6, residual add) run while the block is still in cache.

use super::{Epilogue, Matrix, Out, Pointwise, matmul};

/// Floats of input and output columns a pointwise block aims to keep in a core's L2 cache
/// (384 KiB of the 512 KiB per core of the AMD EPYC here). Each block packs its rows of the
/// weight again, so wider blocks pack it less often: twice the earlier 48 Ki floats made the
/// forward pass about 5% faster at batch 1 and at batch 32 in alternated runs here, where
/// 192 Ki was no faster at batch 32 and slower at batch 1.
const BLOCK_FLOATS: usize = 96 * 1024;

/// `out[b, o, p] = epilogue(Σ_i weight[o, i] · x[b, i, p])`.
///
/// The work is cut into (image, block of columns, block of output rows) tasks: columns so
/// that the input panel and the output block stay in cache for the epilogue, rows only when
/// there are too few column blocks to keep every core busy (small late-stage images).
pub fn pointwise(shape: Pointwise, x: &[f32], weight: &[f32], epi: Epilogue<'_>) -> Vec<f32> {
    let Pointwise {
        batch,
        inputs,
        outputs,
        spatial,
    } = shape;
    shape.check(Some(x), Some(weight), None);
    assert_eq!(epi.bias.len(), outputs, "pointwise bias size");
    let total = batch * outputs * spatial;
    if let Some(r) = epi.residual {
        assert_eq!(r.len(), total, "pointwise residual size");
    }
    // Blocks of equal width: 49 columns in two blocks are 25 and 24, not 36 and 13 (which,
    // with one task per block and row block, left one of two cores idle for much of the conv).
    let most = (BLOCK_FLOATS / (inputs + outputs)).max(16);
    let col_blocks = spatial.div_ceil(most).max(1);
    let cols = spatial.div_ceil(col_blocks).max(1);
    let want = 2 * rayon::current_num_threads();
    let row_parts = (want.div_ceil(batch * col_blocks)).clamp(1, outputs.div_ceil(16).max(1));
    let rows = outputs.div_ceil(row_parts).next_multiple_of(8).min(outputs);
    let row_blocks = outputs.div_ceil(rows);

    // Every element is written by the GEMM (which does not read it) before the epilogue, so
    // the buffer is not zeroed first: that would be one more pass over the output.
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let dst = Out(out.as_mut_ptr());
    let tasks = batch * col_blocks * row_blocks;
    let run = |task: usize| {
        let rb = task % row_blocks;
        let cb = (task / row_blocks) % col_blocks;
        let b = task / (row_blocks * col_blocks);
        let (r0, c0) = (rb * rows, cb * cols);
        let (m, n) = (rows.min(outputs - r0), cols.min(spatial - c0));
        let at = b * outputs * spatial + r0 * spatial + c0;
        let dst = dst;
        // SAFETY: the operands are in bounds by the asserts above (rows r0..r0+m of the
        // weight, columns c0..c0+n of image b), and each task's output block is disjoint.
        unsafe {
            matmul(
                (m, n, inputs),
                Matrix::rows(dst.0.add(at), spatial),
                Matrix::rows(weight.as_ptr().add(r0 * inputs), inputs),
                Matrix::rows(x.as_ptr().add(b * inputs * spatial + c0), spatial),
                false,
            );
        }
        for o in 0..m {
            let row = at + o * spatial;
            // SAFETY: as above; this row segment belongs to this task alone.
            let block = unsafe { std::slice::from_raw_parts_mut(dst.0.add(row), n) };
            let residual = epi.residual.map(|r| &r[row..row + n]);
            finish(block, epi.bias[r0 + o], epi.relu6, residual);
        }
    };
    crate::ml::lanes::each_task(tasks, run);
    // SAFETY: the tasks above cover every (image, row, column) once, and each wrote its block.
    unsafe { out.set_len(total) };
    out
}

versions!(fn finish => finish_body(
    out: &mut [f32], bias: f32, relu6: bool, residual: Option<&[f32]>,
));

#[inline(always)]
fn finish_body(out: &mut [f32], bias: f32, relu6: bool, residual: Option<&[f32]>) {
    match (relu6, residual) {
        (true, None) => out
            .iter_mut()
            .for_each(|v| *v = (*v + bias).clamp(0.0, 6.0)),
        (false, None) => out.iter_mut().for_each(|v| *v += bias),
        (relu6, Some(r)) => out.iter_mut().zip(r).for_each(|(v, r)| {
            let y = *v + bias;
            *v = if relu6 { y.clamp(0.0, 6.0) } else { y } + r;
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::kernels::tests::lcg;

    #[test]
    fn pointwise_matches_the_definition_with_each_epilogue() {
        let shape = Pointwise {
            batch: 2,
            inputs: 5,
            outputs: 37,
            spatial: 2501,
        };
        // 2,501 columns of 42 channels: two blocks of columns (at most 2,340 wide), the last
        // one narrower.
        let x = lcg(2 * 5 * 2501, 4);
        let w = lcg(37 * 5, 5);
        let bias: Vec<f32> = lcg(37, 6).iter().map(|v| v * 8.0).collect();
        let residual = lcg(2 * 37 * 2501, 7);
        for (relu6, res) in [(false, None), (true, None), (false, Some(&residual[..]))] {
            let got = pointwise(
                shape,
                &x,
                &w,
                Epilogue {
                    bias: &bias,
                    relu6,
                    residual: res,
                },
            );
            for b in 0..2 {
                for o in 0..37 {
                    for p in 0..2501 {
                        let mut y = bias[o];
                        for i in 0..5 {
                            y += w[o * 5 + i] * x[(b * 5 + i) * 2501 + p];
                        }
                        if relu6 {
                            y = y.clamp(0.0, 6.0);
                        }
                        let at = (b * 37 + o) * 2501 + p;
                        if let Some(r) = res {
                            y += r[at];
                        }
                        assert!((got[at] - y).abs() < 1e-5, "{relu6} {b} {o} {p}");
                    }
                }
            }
        }
    }

    /// An image's output does not depend on the batch it came in: a batch of one is cut into
    /// more row blocks (m ≤ 64 with n = 49, where `gemm` sums in other runs than for larger
    /// blocks) than a batch of eight. 672 and 1152 inputs are Lite0's two sums longer than
    /// one run; before `DEPTH` the first image differed in the last bits.
    #[test]
    fn an_images_output_has_the_same_bits_in_any_batch() {
        for (inputs, outputs) in [(672, 112), (1152, 192)] {
            let one = Pointwise {
                batch: 1,
                inputs,
                outputs,
                spatial: 49,
            };
            let eight = Pointwise { batch: 8, ..one };
            let x = lcg(8 * inputs * 49, 13);
            let w = lcg(outputs * inputs, 14);
            let bias = vec![0.0; outputs];
            let epi = Epilogue::none(&bias);
            let alone = pointwise(one, &x[..inputs * 49], &w, epi);
            let batched = pointwise(eight, &x, &w, epi);
            assert!(alone.iter().any(|v| *v != 0.0));
            let differ = alone
                .iter()
                .zip(&batched)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differ,
                0,
                "{inputs} inputs: {differ} of {} outputs",
                alone.len()
            );
        }
    }
}
