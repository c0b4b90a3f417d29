// RMSNorm, one workgroup per row: out = x * (1 / sqrt(mean(x^2) + eps)) * weight.
const WG: u32 = 64u;

struct P { rows: u32, cols: u32, eps: f32, _pad: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> part: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x;
    let base = row * p.cols;
    var s = 0.0;
    for (var i = lid; i < p.cols; i += WG) {
        let v = x[base + i];
        s += v * v;
    }
    part[lid] = s;
    workgroupBarrier();
    // Tree reduction over the workgroup's partial sums.
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if (lid < k) { part[lid] += part[lid + k]; }
        workgroupBarrier();
    }
    let inv = 1.0 / sqrt(part[0] / f32(p.cols) + p.eps);
    for (var i = lid; i < p.cols; i += WG) {
        out[base + i] = x[base + i] * inv * weight[i];
    }
}
