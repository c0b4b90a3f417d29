// Top-K of each row of logits on the GPU (K = 1 is argmax), so that greedy decoding reads back
// K (id, value) pairs per row instead of the whole vocabulary. Ties go to the lower id, as a
// stable descending sort would order them. One workgroup per row: each invocation keeps the
// top K of a strided share of the row, then invocation 0 merges the WG * K candidates.
const WG: u32 = 64u;
const K: u32 = $K;

struct P { cols: u32, _a: u32, _b: u32, _c: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out_ids: array<i32>;
@group(0) @binding(3) var<storage, read_write> out_vals: array<f32>;

var<workgroup> cand_v: array<f32, WG * K>;
var<workgroup> cand_i: array<u32, WG * K>;

// a (value va, id ia) ranks before b when larger, or equal with a lower id.
fn before(va: f32, ia: u32, vb: f32, ib: u32) -> bool {
    return va > vb || (va == vb && ia < ib);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    let base = row * p.cols;
    var bv: array<f32, K>;
    var bi: array<u32, K>;
    for (var k = 0u; k < K; k++) { bv[k] = -3.4e38; bi[k] = 0xffffffffu; }
    for (var c = lid; c < p.cols; c += WG) {
        let v = x[base + c];
        if (before(v, c, bv[K - 1u], bi[K - 1u])) {
            // Insertion into the sorted list of K.
            var pos = K - 1u;
            while (pos > 0u && before(v, c, bv[pos - 1u], bi[pos - 1u])) {
                bv[pos] = bv[pos - 1u];
                bi[pos] = bi[pos - 1u];
                pos -= 1u;
            }
            bv[pos] = v;
            bi[pos] = c;
        }
    }
    for (var k = 0u; k < K; k++) {
        cand_v[lid * K + k] = bv[k];
        cand_i[lid * K + k] = bi[k];
    }
    workgroupBarrier();
    if (lid == 0u) {
        for (var k = 0u; k < K; k++) {
            var best = 0u;
            for (var i = 1u; i < WG * K; i++) {
                if (before(cand_v[i], cand_i[i], cand_v[best], cand_i[best])) { best = i; }
            }
            out_ids[row * K + k] = i32(cand_i[best]);
            out_vals[row * K + k] = cand_v[best];
            cand_v[best] = -3.4e38;
            cand_i[best] = 0xffffffffu;
        }
    }
}
