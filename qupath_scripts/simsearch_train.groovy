/*
 * simsearch-wsi: TRAIN a patch classifier from the review session (a background job on the server).
 *
 * Trains on what the session holds: your prototypes and approved suggestions (positives), the
 * suggestions you rejected (negatives), confirmed background and, for self-learning, patches
 * the search suggests on images you have not reviewed. The server writes the model as one .zip
 * file (MODEL, by default model.zip in the session folder) and picks a confidence threshold per
 * class on held-out patches. The script starts the job and prints its progress (stage, epoch,
 * loss) every second until it is done or failed (at most MAX_WAIT_SECONDS; after that the job
 * goes on in the server: see simsearch_status.groovy), then where the model was written and its
 * validation metrics. Stopping the script ("Kill running script") cancels the job.
 *
 * PRESET 'fast' takes minutes on a CPU; 'paper' (the SimSearch paper's schedules) wants a GPU.
 * While the job trains, the server's engine is busy: suggestions wait until it is done.
 * STRATEGY picks the stages: 'pos' (positives only), 'pos+neg' (with your rejected suggestions),
 * 'pos+selflearn' (with self-learning on unreviewed images), 'pos+neg+selflearn' (all).
 *
 * Needs the server, on the machine that can read the slides:
 *     simsearch-wsi serve --allow <folder with your slides and sessions>
 *
 * Targets QuPath 0.4, 0.5, 0.6 and 0.7 (Groovy 4, Java 17-25); also valid Groovy 2.4+.
 * QuPath API used: GsonTools.getInstance().toJson/fromJson; HTTP with java.net.http.
 * No image needs to be open.
 * Every setting can also be given as a Java system property (-Dsimsearch.url=..., see below).
 */
import qupath.lib.io.GsonTools

import java.net.http.HttpClient
import java.net.http.HttpConnectTimeoutException
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.net.http.HttpTimeoutException
import java.nio.charset.StandardCharsets
import java.time.Duration

// ====================================== SETTINGS ======================================
String SERVER_URL = 'http://127.0.0.1:8765'  // where `simsearch-wsi serve` listens
String TOKEN = ''             // the server's --token; empty: none (a server on 127.0.0.1 needs none)
String SESSION = ''           // review session folder as the server sees it, with / even on
                              // Windows, e.g. 'D:/slides/exp1' (the one you reviewed with)
String MODEL = ''             // the model file (.zip) the server writes, as the server sees it;
                              // empty: model.zip in the session folder
String STRATEGY = 'pos+neg+selflearn'  // pos, pos+neg, pos+selflearn or pos+neg+selflearn
String PRESET = 'fast'        // fast (minutes on a CPU) or paper (the paper's schedules)
int SEED = 0                  // the same seed, session and server give the same model on a CPU
int MAX_WAIT_SECONDS = 14400  // stop waiting (not the job) after this long
// ======================================================================================
// Java system properties override the settings (the tests use them; so can headless runs):
SERVER_URL = System.getProperty('simsearch.url', SERVER_URL)
TOKEN = System.getProperty('simsearch.token', TOKEN)
SESSION = System.getProperty('simsearch.session', SESSION).trim()
MODEL = System.getProperty('simsearch.model', MODEL).trim()
STRATEGY = System.getProperty('simsearch.strategy', STRATEGY).trim()
PRESET = System.getProperty('simsearch.preset', PRESET).trim()
SEED = Integer.parseInt(System.getProperty('simsearch.seed', String.valueOf(SEED)))
MAX_WAIT_SECONDS = Integer.parseInt(System.getProperty('simsearch.maxWait', String.valueOf(MAX_WAIT_SECONDS)))

final int PROTOCOL_VERSION = 1  // the simsearch-wsi HTTP protocol this script speaks

Map api = connect(SERVER_URL, TOKEN, PROTOCOL_VERSION)
if (!SESSION)
    fail('Set SESSION in the SETTINGS block to your review session folder (the one you suggested and reviewed with)')
checkServer(api)

Map body = [session: SESSION, strategy: STRATEGY, preset: PRESET, seed: SEED]
if (MODEL)
    body.out = MODEL
Map created = (Map) callServer(api, 'POST', '/jobs/train', body, 30)
String jobId = created.job_id.toString()
println('simsearch train: job ' + jobId + ' started for session ' + SESSION + ' (strategy ' + STRATEGY +
        ', preset ' + PRESET + ', seed ' + SEED + ')')
long started = System.currentTimeMillis()
String last = ''
while (true) {
    Map job = (Map) callServer(api, 'GET', '/jobs/' + jobId, null, 30)
    Map progress = (Map) (job.progress ?: [:])
    int total = ((Number) (progress.total ?: 0)).intValue()
    String line = job.state.toString() + ': ' + progress.stage +
            (total > 0 ? ' (' + ((Number) progress.done).intValue() + '/' + total + ')' : '')
    if (line != last)
        println('  ' + line)
    last = line
    if (job.state == 'done')
        break
    if (job.state == 'failed')
        fail('The training job failed on the server: ' + job.error)
    if (job.state == 'cancelled')
        fail('The training job was cancelled on the server')
    long waited = (System.currentTimeMillis() - started).intdiv(1000)
    if (waited >= MAX_WAIT_SECONDS)
        fail('The training job is still running after ' + waited + ' s; it goes on in the server ' +
                '(job ' + jobId + '; check with simsearch_status.groovy)')
    try {
        Thread.sleep(1000)
    } catch (InterruptedException stopped) {
        sendRequest(api, 'DELETE', '/jobs/' + jobId, null, 10)
        fail('Stopped: asked the server to cancel training job ' + jobId)
    }
}
Map done = (Map) callServer(api, 'GET', '/jobs/' + jobId, null, 30)
Map result = (Map) done.result
Map metrics = (Map) (result.metrics ?: [:])
double seconds = (System.currentTimeMillis() - started) / 1000.0
println('simsearch train: done in ' + String.format(Locale.ROOT, '%.1f', seconds) + ' s: model written to ' +
        result.model + ' (on the server)')
Map thresholds = (Map) (result.thresholds ?: [:])
println('  classes: ' + ((List) result.classes).collect { String c ->
    c + (thresholds.containsKey(c) ? ' (threshold ' + fixed(thresholds.get(c), 2) + ')' : '')
}.join(', '))
Map validation = (Map) metrics.validation
if (validation != null) {
    Map baseline = (Map) metrics.baseline_validation
    println('  validation on ' + ((Number) validation.n).intValue() + ' held-out patches: balanced accuracy ' +
            fixed(validation.balanced_accuracy, 3) + ', accuracy ' + fixed(validation.accuracy, 3) +
            (baseline == null ? '' : '; before training (linear probe on the starting trunk): balanced accuracy ' +
                    fixed(baseline.balanced_accuracy, 3)))
} else {
    println('  validation: none (too few patches per class to hold some out; label more patches)')
}
Map stages = (Map) (metrics.stages ?: [:])
List order = ['selflearn', 'supcon', 'linear']
List names = order.findAll { stages.containsKey(it) } + stages.keySet().findAll { !(it in order) }
println('  stages: ' + names.collect { name ->
    Map m = (Map) stages.get(name)
    name.toString() + ' ' + fixed(m.seconds, 1) + ' s' + (m.views_per_s == null ? '' : ' (' + fixed(m.views_per_s, 1) + ' views/s)')
}.join(', '))
((List) (result.notes ?: [])).each { println('  note: ' + it) }

// ---------------------------------- this script's helpers ----------------------------------

/** A number with `digits` decimals, or "n/a" for a missing value. */
String fixed(Object value, int digits) {
    if (!(value instanceof Number))
        return 'n/a'
    return String.format(Locale.ROOT, '%.' + digits + 'f', ((Number) value).doubleValue())
}

// ------------- HTTP helpers: the same block in every simsearch_*.groovy script -------------

Map connect(String url, String token, int protocol) {
    String base = url == null ? '' : url.trim().replaceAll('/+$', '')
    if (!(base ==~ /(?i)https?:\/\/[^\s\/]+(\/\S*)?/))
        fail('SERVER_URL "' + url + '" is not an http:// address such as http://127.0.0.1:8765')
    HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5))
            .version(HttpClient.Version.HTTP_1_1).build()
    return [url: base, token: token == null ? '' : token.trim(), protocol: protocol, client: client]
}

/** One request; [status, json (parsed, or null), text]. Stops when the server cannot be reached. */
Map sendRequest(Map api, String method, String route, Object body, int timeoutSeconds) {
    HttpRequest.Builder request = HttpRequest.newBuilder(URI.create(api.url + '/api/v1' + route))
            .timeout(Duration.ofSeconds(timeoutSeconds))
            .header('Accept', 'application/json')
            .header('X-SimSearch-Protocol', String.valueOf(api.protocol))
    if (api.token)
        request.header('Authorization', 'Bearer ' + api.token)
    if (body == null) {
        request.method(method, HttpRequest.BodyPublishers.noBody())
    } else {
        String json = GsonTools.getInstance().toJson(body)
        request.header('Content-Type', 'application/json')
        request.method(method, HttpRequest.BodyPublishers.ofString(json, StandardCharsets.UTF_8))
    }
    HttpResponse<String> response = null
    try {
        response = ((HttpClient) api.client).send(request.build(), HttpResponse.BodyHandlers.ofString(StandardCharsets.UTF_8))
    } catch (HttpConnectTimeoutException e) {
        fail(notRunning(api))
    } catch (HttpTimeoutException e) {
        fail('The simsearch-wsi server at ' + api.url + ' did not answer ' + method + ' ' + route + ' within ' +
                timeoutSeconds + ' s; it may still be working (embed large slides first with simsearch_embed.groovy)')
    } catch (IOException e) {
        for (Throwable t = e; t != null; t = t.getCause())
            if (t instanceof ConnectException)
                fail(notRunning(api))
        fail('Could not talk to the simsearch-wsi server at ' + api.url + ': ' + e)
    }
    String text = response.body() == null ? '' : response.body()
    Object json = null
    try {
        json = text.trim() ? GsonTools.getInstance().fromJson(text, Object.class) : null
    } catch (Exception notJson) {
        json = null
    }
    return [status: response.statusCode(), json: json, text: text]
}

/** One request; the parsed JSON answer. Stops with the server's message on an error. */
Object callServer(Map api, String method, String route, Object body, int timeoutSeconds) {
    Map answer = sendRequest(api, method, route, body, timeoutSeconds)
    int status = (int) answer.status
    if (status >= 200 && status < 300 && answer.json != null)
        return answer.json
    fail(errorMessage(api, method, route, answer))
    return null
}

/** GET /health; stops unless a simsearch-wsi server speaking this script's protocol answers. */
Map checkServer(Map api) {
    Map answer = sendRequest(api, 'GET', '/health', null, 10)
    Object json = answer.json
    Object protocol = json instanceof Map ? ((Map) json).protocol : null
    if (answer.status == 200 && protocol instanceof Number && ((Number) protocol).intValue() == api.protocol)
        return (Map) json
    boolean ours = json instanceof Map && (protocol instanceof Number || ((Map) json).error instanceof Map)
    if (!ours || !(answer.status in [200, 404, 409]))
        fail(errorMessage(api, 'GET', '/health', answer))
    String theirs = protocol instanceof Number ? 'protocol ' + ((Number) protocol).intValue() : 'another protocol'
    if (((Map) json).version)
        theirs += ' (simsearch_wsi ' + ((Map) json).version + ')'
    String said = ((Map) json).error instanceof Map ? ' The server says: ' + ((Map) ((Map) json).error).message : ''
    fail('Protocol mismatch: this QuPath script speaks simsearch-wsi protocol ' + api.protocol +
            ', the server at ' + api.url + ' speaks ' + theirs + '. Update the QuPath scripts (use the ' +
            'qupath_scripts folder of the installed simsearch_wsi) or the simsearch_wsi package so that ' +
            'they match.' + said)
    return null
}

String errorMessage(Map api, String method, String route, Map answer) {
    Object json = answer.json
    Object error = json instanceof Map ? ((Map) json).error : null
    if (error instanceof Map)
        return 'simsearch-wsi server error (HTTP ' + answer.status + ' on ' + method + ' /api/v1' + route + '): ' +
                ((Map) error).message
    String text = answer.text.toString().replaceAll('\\s+', ' ').trim()
    return 'The server at ' + api.url + ' answered ' + method + ' /api/v1' + route + ' with HTTP ' + answer.status +
            ', not as simsearch-wsi does (is another program using that address?): ' + text.take(200)
}

String notRunning(Map api) {
    return 'The simsearch-wsi server is not running at ' + api.url + '; start it with ' +
            '`simsearch-wsi serve --allow <folder>` (the folder that holds your slides and sessions)'
}

/** Shows the message (a dialog in QuPath's window, the log when headless) and stops the script. */
void fail(String message) {
    showError('simsearch-wsi', message)
    throw new RuntimeException(message)
}

/** An error dialog when QuPath's GUI runs (0.5+: qupath.fx.dialogs, 0.4: qupath.lib.gui.dialogs); always printed. */
void showError(String title, String message) {
    println('ERROR: ' + message)
    ClassLoader loader = this.getClass().getClassLoader()
    try {
        if (Class.forName('qupath.lib.gui.QuPathGUI', true, loader).getMethod('getInstance').invoke(null) == null)
            return
    } catch (Throwable headless) {
        return
    }
    for (String name : ['qupath.fx.dialogs.Dialogs', 'qupath.lib.gui.dialogs.Dialogs']) {
        try {
            Class.forName(name, true, loader).getMethod('showErrorMessage', String.class, String.class)
                    .invoke(null, title, message)
            return
        } catch (Throwable tryNext) {
        }
    }
}
