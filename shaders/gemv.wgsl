// Decode matrix-vector product for dense weights: y[t, yoff + r] = dot(W[r, :], x[t, :]) (+ b[r])
// for up to RT rows of x. Each invocation owns one weight row and streams it once, with
// vector loads, for all RT rows of x: the weight bytes are read exactly once,
// which is what bounds a decode step.
// Template: $ENABLE, $WV (weight load type), $XV (x load type), $DOT (dot of two $XV).
$ENABLE
override WG: u32 = 64u;
const RT: u32 = $RT;

struct P { rows: u32, nin: u32, nout: u32, ystride: u32, yoff: u32, has_bias: u32, _a: u32, _b: u32 }

@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> w: array<$WV>;
@group(0) @binding(2) var<storage, read> x: array<$XV>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// Scalar product, the $DOT of scalar loads (sizes not divisible by 4).
fn mul1(a: f32, b: f32) -> f32 { return a * b; }

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let r = (wid.x + wid.y * nwg.x) * WG + lid;
    if (r >= p.nout) { return; }
    var acc: array<f32, RT>;
    let base = r * p.nin;
    for (var k = 0u; k < p.nin; k++) {
        let wv = $XV(w[base + k]);
        for (var t = 0u; t < RT; t++) {
            acc[t] += $DOT(wv, x[min(t, p.rows - 1u) * p.nin + k]);
        }
    }
    var b = 0.0;
    if (p.has_bias != 0u) { b = bias[r]; }
    for (var t = 0u; t < min(RT, p.rows); t++) {
        y[t * p.ystride + p.yoff + r] = acc[t] + b;
    }
}
