// Decode matrix-vector product for dense weights: y[t, yoff + r] = dot(W[r, :], x[t, :]) (+ b[r])
// for up to RT rows of x. Each invocation owns CR consecutive weight rows and streams them once
// with vector loads, for all RT rows of x. On lavapipe (shaders run on CPU threads) every
// per-lane load is costly, so sharing each loaded x vector between CR weight rows is what
// raises the weight bandwidth (measured: CR = 8 about 1.7x CR = 1).
// Template: $ENABLE, $WV (weight load type), $XV (x load type), $DOT (dot of two $XV).
$ENABLE
override WG: u32 = 64u;
const RT: u32 = $RT;
const CR: u32 = $CR;

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
    let r0 = ((wid.x + wid.y * nwg.x) * WG + lid) * CR;
    if (r0 >= p.nout) { return; }
    let t0 = wid.z * RT;  // this workgroup's block of x rows
    var acc: array<array<f32, CR>, RT>;
    // Rows past the end read the last row again (their results are not stored).
    var wb: array<u32, CR>;
    for (var c = 0u; c < CR; c++) { wb[c] = min(r0 + c, p.nout - 1u) * p.nin; }
    var xb: array<u32, RT>;
    for (var t = 0u; t < RT; t++) { xb[t] = min(t0 + t, p.rows - 1u) * p.nin; }
    for (var k = 0u; k < p.nin; k++) {
        var wv: array<$XV, CR>;
        for (var c = 0u; c < CR; c++) { wv[c] = $XV(w[wb[c] + k]); }
        for (var t = 0u; t < RT; t++) {
            let xv = x[xb[t] + k];
            for (var c = 0u; c < CR; c++) { acc[t][c] += $DOT(wv[c], xv); }
        }
    }
    for (var c = 0u; c < CR; c++) {
        let r = r0 + c;
        if (r >= p.nout) { break; }
        var b = 0.0;
        if (p.has_bias != 0u) { b = bias[r]; }
        for (var t = 0u; t < min(RT, p.rows - t0); t++) {
            y[(t0 + t) * p.ystride + p.yoff + r] = acc[t][c] + b;
        }
    }
}
