/*
 * simsearch-wsi: the SIMSEARCH PANEL, the whole review loop in one window with a live threshold.
 *
 * Run it once from the script editor (or Automate > Shared scripts); it opens a window and
 * returns. The window works on the image open in the viewer:
 *   - Suggest: sends the classified rectangle annotations (the selected ones, if any annotation
 *     is selected; none: the session's saved prototypes) and gets the candidates of each class
 *     down to FLOOR, ranked, with their "similarity" measurement, and the class heat maps.
 *     Suggest again replaces the panel's own candidates of those classes that you left as they
 *     came; the ones you gave another class (e.g. "Rejected suggestion") stay, reviewed or not.
 *     The sliders start at the session's thresholds (Suggest does not save them; Review does).
 *   - one slider per class: the class's similarity threshold. Moving it shows the candidates at
 *     or above it and hides the others at once (no server round trip); the count is live.
 *     Candidates you gave another class (e.g. "Rejected suggestion") or deleted stay as you left
 *     them.
 *   - Heat map: the selected class's similarity over the slide, drawn over the image like a
 *     pixel classification (toggle with QuPath's "Show pixel classification" button, C). It
 *     goes away when another image is opened and when the window closes.
 *   - after switching to another image, Suggest again: until then the sliders do nothing (they
 *     belong to the image they were made for, and say so).
 *   - Review: records your decisions and the thresholds the sliders ended at in the session.
 *   - Background: adds background candidates (class "background") to confirm or reject.
 *   - Train / Predict: server jobs with their progress; Predict imports the model's objects.
 *   - the status line says whether the server answers, and what the last action did.
 *
 * Needs the server, on the machine that can read the slides:
 *     simsearch-wsi serve --allow <folder with your slides and sessions>
 *
 * Targets QuPath 0.4, 0.5, 0.6 and 0.7 (Groovy 4, Java 17-25, JavaFX); also valid Groovy 2.4+.
 * QuPath API used: QuPathGUI.getInstance().getImageData()/getViewer() (0.4+), getCurrentImageData()
 * when there is no GUI, ImageData.getServer().getURIs()/getHierarchy(), PathObjectHierarchy
 * addObjects(Collection) (0.4+)/removeObjects(Collection, boolean)/getAnnotationObjects()/
 * getDetectionObjects()/getSelectionModel().getSelectedObjects(), PathIO.readObjectsFromGeoJSON
 * (keeps the GeoJSON "id": 0.4+), GsonTools, PathObject.getPathClass/getROI/getMeasurementList,
 * BufferedImageOverlay(QuPathViewer, OverlayOptions, Map<ImageRegion, BufferedImage>) (removes itself
 * when the viewer opens another image),
 * QuPathViewer.setCustomPixelLayerOverlay/resetCustomPixelLayerOverlay/getCustomPixelLayerOverlay,
 * ImageRegion.createInstance; JavaFX (Platform.runLater) for the window; HTTP with java.net.http.
 * Objects are added and removed on the JavaFX thread; server calls run on a background thread.
 * Every setting can also be given as a Java system property (-Dsimsearch.url=..., see below).
 */
import javafx.application.Platform
import javafx.beans.value.ChangeListener
import javafx.event.EventHandler
import javafx.geometry.Insets
import javafx.geometry.Pos
import javafx.scene.Scene
import javafx.scene.control.Button
import javafx.scene.control.CheckBox
import javafx.scene.control.ComboBox
import javafx.scene.control.Label
import javafx.scene.control.ProgressBar
import javafx.scene.control.Separator
import javafx.scene.control.Slider
import javafx.scene.control.TextField
import javafx.scene.layout.GridPane
import javafx.scene.layout.HBox
import javafx.scene.layout.VBox
import javafx.stage.Stage
import qupath.lib.gui.QuPathGUI
import qupath.lib.gui.viewer.overlays.BufferedImageOverlay
import qupath.lib.io.GsonTools
import qupath.lib.io.PathIO
import qupath.lib.objects.PathObject
import qupath.lib.regions.ImageRegion

import javax.imageio.ImageIO
import java.awt.image.BufferedImage
import java.net.http.HttpClient
import java.net.http.HttpConnectTimeoutException
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.net.http.HttpTimeoutException
import java.nio.charset.StandardCharsets
import java.nio.file.Files
import java.time.Duration

// ====================================== SETTINGS ======================================
String SERVER_URL = 'http://127.0.0.1:8765'  // where `simsearch-wsi serve` listens
String TOKEN = ''             // the server's --token; empty: none (a server on 127.0.0.1 needs none)
String SESSION = ''           // review session folder as the server sees it, with / even on
                              // Windows, e.g. 'D:/slides/exp1' (can also be typed in the panel)
double FLOOR = 0.2            // candidates down to this similarity come back: the sliders' lower end
int BACKGROUND = 10           // the Background button: N most and N least similar unlabelled patches
String RULE = ''              // the search rule (also a choice in the window): 'object' (the objects
                              // are as big as the prototype boxes; the server's default), 'patch'
                              // (one patch per suggestion, a patch apart) or empty: the session's
                              // rule, else the server's
String CANDIDATES = ''        // where the object rule's suggestions come from (also a choice in the
                              // window): 'objects' (one per separate object found, compared at its
                              // own size), 'grid' (the best windows of a grid), 'auto' (objects
                              // where the prototypes outline separate objects, else the grid; the
                              // server's default) or empty: the session's, else the server's
String MODEL = ''             // the model (.zip) Train writes and Predict applies, as the server
                              // sees it; empty: model.zip in the session folder
String STRATEGY = 'pos+neg+selflearn'  // Train: pos, pos+neg, pos+selflearn or pos+neg+selflearn
String PRESET = 'fast'        // Train: fast (minutes on a CPU) or paper
int SEED = 0                  // Train: the seed
int TIMEOUT_SECONDS = 900     // the first suggest on a slide embeds it (minutes on a CPU)
// ======================================================================================
// Java system properties override the settings (the tests use them; so can headless runs):
SERVER_URL = System.getProperty('simsearch.url', SERVER_URL)
TOKEN = System.getProperty('simsearch.token', TOKEN)
SESSION = System.getProperty('simsearch.session', SESSION).trim()
FLOOR = Double.parseDouble(System.getProperty('simsearch.floor', String.valueOf(FLOOR)))
BACKGROUND = Integer.parseInt(System.getProperty('simsearch.background', String.valueOf(BACKGROUND)))
RULE = System.getProperty('simsearch.rule', RULE).trim()
CANDIDATES = System.getProperty('simsearch.candidates', CANDIDATES).trim()
MODEL = System.getProperty('simsearch.model', MODEL).trim()
STRATEGY = System.getProperty('simsearch.strategy', STRATEGY).trim()
PRESET = System.getProperty('simsearch.preset', PRESET).trim()
SEED = Integer.parseInt(System.getProperty('simsearch.seed', String.valueOf(SEED)))
TIMEOUT_SECONDS = Integer.parseInt(System.getProperty('simsearch.timeout', String.valueOf(TIMEOUT_SECONDS)))

final int PROTOCOL_VERSION = 1  // the simsearch-wsi HTTP protocol this script speaks

denseOf(RULE)  // a mistyped RULE or CANDIDATES fails here, before the window opens
candidatesOf(CANDIDATES)
Map api = connect(SERVER_URL, TOKEN, PROTOCOL_VERSION)
// Everything the window needs, in one map (script methods cannot see the script's variables)
Map panel = [api: api, session: SESSION, floor: FLOOR, background: BACKGROUND, model: MODEL, rule: RULE,
             candidates: CANDIDATES,
             strategy: STRATEGY, preset: PRESET, seed: SEED, timeout: TIMEOUT_SECONDS,
             classes: new LinkedHashMap(), heat: new LinkedHashMap(), heatMeta: null, heatHierarchy: null,
             overlay: null,
             predicted: [], busy: false, ui: [:]]
Platform.runLater({ openWindow(panel) } as Runnable)
println('simsearch panel: opened for the server at ' + api.url + (SESSION ? ' (session ' + SESSION + ')' : ''))

// ------------------------------------ the window ------------------------------------

void openWindow(Map panel) {
    Map ui = (Map) panel.ui
    Label server = new Label('server: checking ' + panel.api.url + ' ...')
    server.setId('server-status')
    Button refresh = new Button('Check')
    refresh.setId('refresh')
    TextField session = new TextField((String) panel.session)
    session.setId('session')
    session.setPromptText('session folder as the server sees it, e.g. D:/slides/exp1')
    session.setPrefColumnCount(28)
    session.textProperty().addListener({ o, a, b -> panel.session = b.trim() } as ChangeListener)
    ComboBox<String> rule = new ComboBox<String>()
    rule.setId('rule')
    rule.getItems().setAll(['default', 'object', 'patch'])
    rule.setValue(panel.rule ?: 'default')
    // 'default': the session's rule, else the server's
    rule.valueProperty().addListener({ o, a, b -> panel.rule = b == 'default' ? '' : b } as ChangeListener)
    ComboBox<String> candidates = new ComboBox<String>()
    candidates.setId('candidates')
    candidates.getItems().setAll(['default', 'auto', 'grid', 'objects'])
    candidates.setValue(panel.candidates ?: 'default')
    // 'default': the session's candidates, else the server's
    candidates.valueProperty().addListener({ o, a, b -> panel.candidates = b == 'default' ? '' : b } as ChangeListener)
    List<Button> actions = []
    Map labels = [suggest: 'Suggest', review: 'Review', background: 'Background', train: 'Train', predict: 'Predict']
    labels.each { String id, String text ->
        Button b = new Button(text)
        b.setId(id)
        actions << b
    }
    CheckBox heat = new CheckBox('Heat map')
    heat.setId('heatmap')
    ComboBox<String> heatClass = new ComboBox<String>()
    heatClass.setId('heatmap-class')
    GridPane sliders = new GridPane()
    sliders.setId('sliders')
    sliders.setHgap(8)
    sliders.setVgap(4)
    ProgressBar progress = new ProgressBar(0)
    progress.setId('job-progress')
    progress.setPrefWidth(160)
    Label status = new Label('Draw and classify a few rectangles per class, then Suggest.')
    status.setId('job-status')
    status.setWrapText(true)
    status.setMaxWidth(560)
    ui.putAll([server: server, status: status, progress: progress, sliders: sliders, heat: heat,
               heatClass: heatClass, actions: actions])

    refresh.setOnAction({ e -> checkInBackground(panel) } as EventHandler)
    actions[0].setOnAction({ e -> run(panel, 'Suggest', { suggest(panel) }) } as EventHandler)
    actions[1].setOnAction({ e -> run(panel, 'Review', { review(panel) }) } as EventHandler)
    actions[2].setOnAction({ e -> run(panel, 'Background', { background(panel) }) } as EventHandler)
    actions[3].setOnAction({ e -> run(panel, 'Train', { train(panel) }) } as EventHandler)
    actions[4].setOnAction({ e -> run(panel, 'Predict', { predict(panel) }) } as EventHandler)
    heat.selectedProperty().addListener({ o, a, b -> showHeatmap(panel) } as ChangeListener)
    heatClass.valueProperty().addListener({ o, a, b -> showHeatmap(panel) } as ChangeListener)

    HBox top = new HBox(8, server, refresh)
    top.setAlignment(Pos.CENTER_LEFT)
    HBox sessionRow = new HBox(8, new Label('Session'), session, new Label('Rule'), rule,
            new Label('Candidates'), candidates)
    sessionRow.setAlignment(Pos.CENTER_LEFT)
    HBox buttons = new HBox(6)
    buttons.getChildren().addAll(actions)
    HBox heatRow = new HBox(8, heat, heatClass)
    heatRow.setAlignment(Pos.CENTER_LEFT)
    Label thresholds = new Label('Similarity threshold per class (candidates at or above it are shown)')
    HBox jobRow = new HBox(8, progress, status)
    jobRow.setAlignment(Pos.CENTER_LEFT)
    VBox root = new VBox(8, top, sessionRow, buttons, new Separator(), thresholds, sliders, heatRow,
            new Separator(), jobRow)
    root.setPadding(new Insets(10))
    Stage stage = new Stage()
    stage.setTitle('SimSearch')
    stage.setScene(new Scene(root, 780, 380))
    ui.stage = stage
    stage.setOnHidden({ e -> clearHeatmap(panel) } as EventHandler)
    stage.show()
    checkInBackground(panel)
}

/** Runs an action on a background thread, one at a time; its errors go to the status line. */
void run(Map panel, String name, Closure action) {
    Map ui = (Map) panel.ui
    synchronized (panel) {
        if (panel.busy) {
            ((Label) ui.status).setText(name + ': wait for the running action to finish')
            return
        }
        panel.busy = true
    }
    ((List) ui.actions).each { ((Button) it).setDisable(true) }
    ((Label) ui.status).setText(name + ': working ...')
    ((ProgressBar) ui.progress).setProgress(-1)
    Thread worker = new Thread({
        String message
        try {
            message = name + ': ' + action.call()
        } catch (Throwable t) {
            message = name + ' failed: ' + t.getMessage()
        }
        Platform.runLater({
            ((Label) ui.status).setText(message)
            ((ProgressBar) ui.progress).setProgress(message.contains(' failed: ') ? 0 : 1)
            ((List) ui.actions).each { ((Button) it).setDisable(false) }
            synchronized (panel) {
                panel.busy = false
            }
        } as Runnable)
    } as Runnable, 'simsearch-panel-' + name)
    worker.setDaemon(true)
    worker.start()
}

/** Runs on the JavaFX thread and waits for it (objects change there). */
Object onFx(Closure work) {
    if (Platform.isFxApplicationThread())
        return work.call()
    Object[] out = new Object[1]
    Throwable[] error = new Throwable[1]
    java.util.concurrent.CountDownLatch done = new java.util.concurrent.CountDownLatch(1)
    Platform.runLater({
        try {
            out[0] = work.call()
        } catch (Throwable t) {
            error[0] = t
        } finally {
            done.countDown()
        }
    } as Runnable)
    done.await()
    if (error[0] != null)
        throw error[0]
    return out[0]
}

void checkInBackground(Map panel) {
    Thread t = new Thread({
        String text
        try {
            Map health = checkServer((Map) panel.api)
            text = 'server: ' + panel.api.url + ' answers (simsearch_wsi ' + health.version + ', protocol ' +
                    ((Number) health.protocol).intValue() + ')'
        } catch (Throwable e) {
            text = 'server: ' + e.getMessage()
        }
        Platform.runLater({ ((Label) panel.ui.server).setText(text) } as Runnable)
    } as Runnable, 'simsearch-panel-health')
    t.setDaemon(true)
    t.start()
}

// ------------------------------------ the actions ------------------------------------

String suggest(Map panel) {
    Map api = (Map) panel.api
    Map image = currentImage()
    List prototypes = (List) onFx {
        def hierarchy = image.hierarchy
        List chosen = new ArrayList(hierarchy.getSelectionModel().getSelectedObjects()).findAll { PathObject p -> p.isAnnotation() }
        if (chosen.isEmpty())
            chosen = new ArrayList(hierarchy.getAnnotationObjects())
        return chosen.findAll { PathObject p -> isPrototype(p) }
    }
    if (prototypes.isEmpty() && !panel.session)
        fail('No prototypes: draw rectangle annotations around a few examples, give each a class, ' +
                'and Suggest again (or give a session with saved prototypes)')
    // no thresholds: the session's (or the default) apply; only Review saves the sliders'
    Map body = [image: image.uri, floor: panel.floor, heatmap: true, background: 0]
    if (!prototypes.isEmpty())
        body.annotations = [type: 'FeatureCollection', features: toFeatures(prototypes)]
    if (panel.session)
        body.session = panel.session
    Boolean dense = denseOf((String) panel.rule)
    if (dense != null)
        body.dense = dense
    String candidatesRule = candidatesOf((String) panel.candidates)
    if (candidatesRule != null)
        body.candidates = candidatesRule
    Map answer = (Map) callServer(api, 'POST', '/suggest', body, (int) panel.timeout)
    Map summary = (Map) answer.summary
    List objects = readFeatures((List) answer.features)
    Map heat = decodeHeatmaps((Map) answer.heatmap, (double) panel.floor)
    onFx {
        replaceCandidates(panel, image, summary, objects)
        panel.heat = heat
        panel.heatMeta = answer.heatmap
        panel.heatHierarchy = image.hierarchy
        ComboBox<String> heatClass = (ComboBox<String>) panel.ui.heatClass
        heatClass.getItems().setAll(new ArrayList<String>(heat.keySet()))
        if (!heat.isEmpty())
            heatClass.setValue(heatClass.getItems().contains(heatClass.getValue()) ? heatClass.getValue() : heatClass.getItems().get(0))
        showHeatmap(panel)
    }
    String counts = ((Map) panel.classes).findAll { String c, Map e -> summary.thresholds.containsKey(c) }.collect { String c, Map e -> c + ' ' + e.shown.size() + ' of ' + e.objects.size() }.join(', ')
    return 'candidates down to ' + fixed(panel.floor, 2) + ' (' + counts + ' shown), ' +
            (summary.object_size_l0 ? 'object' : 'patch') + ' rule, ' + (summary.candidates == 'objects' ? 'object' : 'grid') +
            ' candidates; embed ' +
            summary.seconds_embed + ' s, query ' + summary.seconds_query + ' s'
}

String review(Map panel) {
    if (!panel.session)
        fail('Type the session folder (the one you suggested with) first')
    Map image = currentImage()
    List objects = (List) onFx {
        def hierarchy = image.hierarchy
        List all = new ArrayList(hierarchy.getAnnotationObjects())
        all.addAll(new ArrayList(hierarchy.getDetectionObjects()).findAll { PathObject p -> p.getMeasurementList().containsKey('similarity') })
        return all
    }
    Map thresholds = [:]  // the sliders made for this image
    ((Map) panel.classes).each { String c, Map entry ->
        if (entry.hierarchy.is(image.hierarchy))
            thresholds.put(c, entry.threshold)
    }
    Map body = [image: image.uri, session: panel.session, thresholds: thresholds,
                annotations: [type: 'FeatureCollection', features: toFeatures(objects)]]
    Map report = (Map) callServer((Map) panel.api, 'POST', '/review', body, 120)
    List<String> keys = ['approved', 'rejected', 'relabelled', 'background', 'not_background', 'new_prototypes',
                         'below_threshold', 'unreviewed', 'unchanged']
    return keys.collect { String k -> k.replace('_', ' ') + ' ' + ((Number) (report.get(k) ?: 0)).intValue() }.join(', ') +
            '; thresholds ' + thresholds.collect { k, v -> k + '=' + fixed(v, 2) }.join(' ') + ' saved in the session'
}

String background(Map panel) {
    if (!panel.session)
        fail('Type the session folder first (Background uses its prototypes)')
    Map image = currentImage()
    Map body = [image: image.uri, session: panel.session, n: panel.background]
    Boolean dense = denseOf((String) panel.rule)  // the Rule and Candidates choices, as Suggest
    if (dense != null)
        body.dense = dense
    String candidatesRule = candidatesOf((String) panel.candidates)
    if (candidatesRule != null)
        body.candidates = candidatesRule
    Map answer = (Map) callServer((Map) panel.api, 'POST', '/background', body, (int) panel.timeout)
    List objects = readFeatures((List) answer.features)
    onFx {
        def hierarchy = image.hierarchy
        List earlier = new ArrayList(hierarchy.getDetectionObjects()).findAll { PathObject p ->
            p.getMeasurementList().containsKey('similarity') && className(p) == 'background'
        }
        hierarchy.removeObjects(earlier, true)
        hierarchy.addObjects(objects)
    }
    return 'added ' + objects.size() + ' "background" candidates; keep the real background, give the others ' +
            '"Rejected suggestion", then Review'
}

String train(Map panel) {
    if (!panel.session)
        fail('Type the session folder (the one you reviewed with) first')
    Map body = [session: panel.session, strategy: panel.strategy, preset: panel.preset, seed: panel.seed]
    if (panel.model)
        body.out = panel.model
    Map result = runJob(panel, '/jobs/train', body)
    panel.model = result.model.toString()
    Map validation = (Map) ((Map) (result.metrics ?: [:])).validation
    return 'model written to ' + result.model + ' (on the server)' + (validation == null ? '' :
            '; validation balanced accuracy ' + fixed(validation.balanced_accuracy, 3))
}

String predict(Map panel) {
    String model = panel.model ?: (panel.session ? panel.session.toString().replaceAll('/+$', '') + '/model.zip' : '')
    if (!model)
        fail('Train first, or set MODEL (the model .zip as the server sees it)')
    Map image = currentImage()
    Map body = [images: [image.uri], model: model, out: model.replaceAll('[^/\\\\]*$', '') + 'predictions']
    Map result = runJob(panel, '/jobs/predict', body)
    Map predicted = (Map) ((List) result.images).get(0)
    File geojson = new File(((Map) predicted.outputs).geojson.toString())
    if (!geojson.isFile())
        fail('The server wrote ' + geojson + ', but QuPath cannot read that file here (run QuPath on the server\'s machine)')
    List objects = null
    InputStream stream = Files.newInputStream(geojson.toPath())
    try {
        objects = PathIO.readObjectsFromGeoJSON(stream)
    } finally {
        stream.close()
    }
    onFx {
        image.hierarchy.removeObjects(new ArrayList((List) panel.predicted), true)
        image.hierarchy.addObjects(objects)
        panel.predicted = objects
    }
    return 'added ' + objects.size() + ' objects of model ' + model
}

/** Starts a server job and follows it, with its progress on the bar; its result. */
Map runJob(Map panel, String route, Map body) {
    Map api = (Map) panel.api
    String id = ((Map) callServer(api, 'POST', route, body, 60)).job_id.toString()
    while (true) {
        Map job = (Map) callServer(api, 'GET', '/jobs/' + id, null, 30)
        Map progress = (Map) (job.progress ?: [:])
        double total = ((Number) (progress.total ?: 0)).doubleValue()
        double done = ((Number) (progress.done ?: 0)).doubleValue()
        String text = 'job ' + id + ' ' + job.state + ': ' + (progress.stage ?: '') + (total > 0 ? ' (' + (int) done + '/' + (int) total + ')' : '')
        Platform.runLater({
            ((ProgressBar) panel.ui.progress).setProgress(total > 0 ? done / total : -1)
            ((Label) panel.ui.status).setText(text)
        } as Runnable)
        if (job.state == 'done')
            return (Map) job.result
        if (job.state == 'failed')
            fail('the job failed on the server: ' + job.error)
        if (job.state == 'cancelled')
            fail('the job was cancelled on the server')
        Thread.sleep(500)
    }
}

// ------------------------------ candidates and the live threshold ------------------------------

/** Replaces the panel's earlier candidates of the answer's classes on this image (only those
 * still of the class they came with: what the user relabelled stays, reviewed or not), forgets
 * the sliders of other images (their objects stay as they are) and makes one slider per class. */
void replaceCandidates(Map panel, Map image, Map summary, List objects) {
    def hierarchy = image.hierarchy
    Map thresholds = (Map) summary.thresholds
    Set<String> classes = new HashSet<String>(thresholds.keySet().collect { it.toString() })
    Map entries = (Map) panel.classes
    entries.keySet().removeAll(entries.findAll { String c, Map e -> !e.hierarchy.is(hierarchy) }.keySet())
    Set present = new HashSet(hierarchy.getDetectionObjects())
    List earlier = []
    entries.each { String c, Map e ->
        if (classes.contains(c))
            earlier.addAll(((List) e.objects).findAll { PathObject p -> present.contains(p) && className(p) == c })
    }
    hierarchy.removeObjects(earlier, true)
    Map byClass = new LinkedHashMap()
    thresholds.keySet().each { byClass.put(it.toString(), []) }
    objects.each { PathObject p -> ((List) byClass.get(className(p)))?.add(p) }
    ((Map) panel.classes).keySet().removeAll(classes)
    byClass.each { String c, List list ->
        list.sort { PathObject a, PathObject b -> Double.compare(similarity(b), similarity(a)) }
        ((Map) panel.classes).put(c, [objects: list, shown: new HashSet(), deleted: new HashSet(),
                                      threshold: ((Number) thresholds.get(c)).doubleValue(),
                                      hierarchy: hierarchy])
    }
    GridPane grid = (GridPane) panel.ui.sliders
    grid.getChildren().clear()
    int row = 0
    ((Map) panel.classes).each { String c, Map entry ->
        double low = Math.min((double) panel.floor, (double) entry.threshold)
        Slider slider = new Slider(low, 1.0, (double) entry.threshold)
        slider.setId('slider-' + c)
        slider.setPrefWidth(260)
        slider.setBlockIncrement(0.01)
        Label value = new Label(fixed(entry.threshold, 2))
        value.setId('value-' + c)
        Label count = new Label('')
        count.setId('count-' + c)
        entry.count = count
        slider.valueProperty().addListener({ o, a, b ->
            entry.threshold = ((Number) b).doubleValue()
            value.setText(fixed(entry.threshold, 2))
            applyThreshold(panel, c)
        } as ChangeListener)
        grid.addRow(row++, new Label(c), slider, value, count)
        applyThreshold(panel, c)
    }
}

/** Shows the class's candidates at or above its threshold and hides the others (JavaFX thread),
 * on the image the slider was made for, and only while that image is the one open. Candidates
 * the user gave another class stay; deleted ones stay deleted. */
void applyThreshold(Map panel, String c) {
    Map entry = (Map) ((Map) panel.classes).get(c)
    def hierarchy = entry.hierarchy
    if (!hierarchy.is(openHierarchy())) {
        ((Label) panel.ui.status).setText('The sliders were made for another image: Suggest on this one')
        return
    }
    Set present = new HashSet(hierarchy.getDetectionObjects())
    Set shown = (Set) entry.shown
    Set deleted = (Set) entry.deleted
    List add = []
    List remove = []
    Set wanted = new HashSet()
    ((List) entry.objects).each { PathObject p ->
        boolean inside = present.contains(p)
        if (!inside && shown.contains(p))
            deleted.add(p)  // the user deleted it
        boolean want = !deleted.contains(p) && (className(p) != c || similarity(p) >= (double) entry.threshold)
        if (want)
            wanted.add(p)
        if (want && !inside)
            add.add(p)
        else if (!want && inside)
            remove.add(p)
    }
    if (!remove.isEmpty())
        hierarchy.removeObjects(remove, true)
    if (!add.isEmpty())
        hierarchy.addObjects(add)
    entry.shown = wanted
    ((Label) entry.count).setText(wanted.size() + ' of ' + ((List) entry.objects).size() + ' shown')
}

double similarity(PathObject p) {
    return p.getMeasurementList().get('similarity')
}

// ------------------------------------ the heat map ------------------------------------

/** The answer's PNG heat maps (grey = 255 x similarity, alpha 0 = not embedded) coloured for
 * display: transparent below the floor, then blue -> cyan -> yellow -> red up to 1. */
@groovy.transform.CompileStatic
Map<String, BufferedImage> decodeHeatmaps(Map heatmap, double floor) {
    Map<String, BufferedImage> out = new LinkedHashMap<String, BufferedImage>()
    if (heatmap == null)
        return out
    int[] lut = new int[256]
    for (int g = 0; g < 256; g++) {
        double s = g / 255.0d
        lut[g] = s < floor ? 0 : heatColor((s - floor) / Math.max(1e-6d, 1.0d - floor))
    }
    Map pngs = (Map) heatmap.get('png_base64')
    for (Object name : pngs.keySet()) {
        byte[] bytes = Base64.getDecoder().decode(pngs.get(name).toString())
        BufferedImage grey = ImageIO.read(new ByteArrayInputStream(bytes))
        int w = grey.getWidth()
        int h = grey.getHeight()
        java.awt.image.Raster raster = grey.getRaster()
        int bands = raster.getNumBands()
        int[] values = raster.getSamples(0, 0, w, h, 0, (int[]) null)
        int[] alpha = bands > 1 ? raster.getSamples(0, 0, w, h, bands - 1, (int[]) null) : null
        int[] argb = new int[w * h]
        for (int i = 0; i < argb.length; i++)
            argb[i] = (alpha != null && alpha[i] == 0) ? 0 : lut[values[i]]
        BufferedImage rgba = new BufferedImage(w, h, BufferedImage.TYPE_INT_ARGB)
        rgba.setRGB(0, 0, w, h, argb, 0, w)
        out.put(name.toString(), rgba)
    }
    return out
}

/** ARGB of a value in [0, 1]: blue, cyan, yellow, red; alpha 160. */
@groovy.transform.CompileStatic
int heatColor(double t) {
    double v = Math.max(0.0d, Math.min(1.0d, t))
    int[][] stops = [[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]] as int[][]
    double pos = v * (stops.length - 1)
    int i = (int) Math.min(Math.floor(pos), (double) (stops.length - 2))
    double f = pos - i
    int[] rgb = new int[3]
    for (int k = 0; k < 3; k++)
        rgb[k] = (int) Math.round(stops[i][k] + f * (stops[i + 1][k] - stops[i][k]))
    return (160 << 24) | (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
}

/** Draws the selected class's heat map over the slide (level-0 region of the heat map's grid). */
void showHeatmap(Map panel) {
    QuPathGUI gui = QuPathGUI.getInstance()
    def viewer = gui == null ? null : gui.getViewer()
    if (viewer == null)
        return
    String name = ((ComboBox<String>) panel.ui.heatClass).getValue()
    BufferedImage img = name == null ? null : (BufferedImage) ((Map) panel.heat).get(name)
    boolean here = panel.heatHierarchy != null && panel.heatHierarchy.is(openHierarchy())
    if (!((CheckBox) panel.ui.heat).isSelected() || img == null || !here) {
        clearHeatmap(panel)
        return
    }
    // pixel (u, v) covers level-0 x from origin_l0[0] + u * downsample (y likewise): the origin
    // is rounded to a whole level-0 pixel here (ImageRegion holds integers)
    Map meta = (Map) panel.heatMeta
    double dx = ((Number) meta.downsample).doubleValue()
    double dy = ((Number) (meta.downsample_y ?: meta.downsample)).doubleValue()
    List origin = (List) (meta.origin_l0 ?: [0, 0])
    int x0 = (int) Math.round(((Number) origin[0]).doubleValue())
    int y0 = (int) Math.round(((Number) origin[1]).doubleValue())
    ImageRegion region = ImageRegion.createInstance(x0, y0, (int) Math.round(img.getWidth() * dx),
            (int) Math.round(img.getHeight() * dy), viewer.getZPosition(), viewer.getTPosition())
    Map<ImageRegion, BufferedImage> regions = new LinkedHashMap<ImageRegion, BufferedImage>()
    regions.put(region, img)
    panel.overlay = new BufferedImageOverlay(viewer, viewer.getOverlayOptions(), regions)
    viewer.setCustomPixelLayerOverlay(panel.overlay)
    viewer.repaint()
}

/** Takes the panel's heat map off the viewer (if it is still the one shown). */
void clearHeatmap(Map panel) {
    QuPathGUI gui = QuPathGUI.getInstance()
    def viewer = gui == null ? null : gui.getViewer()
    if (viewer != null && panel.overlay != null && viewer.getCustomPixelLayerOverlay().is(panel.overlay))
        viewer.resetCustomPixelLayerOverlay()
    panel.overlay = null
}

// ---------------------------------- this script's helpers ----------------------------------

/** The server's "dense" field for the rule: 'object' -> true, 'patch' -> false, '' -> null. */
Boolean denseOf(String rule) {
    if (rule == 'object')
        return Boolean.TRUE
    if (rule == 'patch')
        return Boolean.FALSE
    if (rule)
        fail('RULE \'' + rule + '\': use \'object\', \'patch\' or \'\' (the session\'s or the server\'s rule)')
    return null
}

/** The server's "candidates" field: 'auto', 'grid' or 'objects' as given, '' -> null. */
String candidatesOf(String candidates) {
    if (candidates in ['auto', 'grid', 'objects'])
        return candidates
    if (candidates)
        fail('CANDIDATES \'' + candidates + '\': use \'auto\', \'grid\', \'objects\' or \'\' (the session\'s or the server\'s)')
    return null
}

/** The image open in the viewer now: [uri, hierarchy]. */
Map currentImage() {
    return (Map) onFx {
        QuPathGUI gui = QuPathGUI.getInstance()
        def data = gui == null ? null : gui.getImageData()
        if (data == null)
            data = getCurrentImageData()
        if (data == null)
            fail('No image is open: open the slide in QuPath first')
        Collection uris = data.getServer().getURIs()
        if (uris == null || uris.isEmpty())
            fail('The current image has no URI; simsearch-wsi reads images from disk: open the image from a file')
        return [uri: uris.iterator().next().toString(), hierarchy: data.getHierarchy()]
    }
}

/** The hierarchy of the image open now (null when none is); JavaFX thread. */
Object openHierarchy() {
    QuPathGUI gui = QuPathGUI.getInstance()
    def data = gui == null ? null : gui.getImageData()
    if (data == null)
        data = getCurrentImageData()
    return data == null ? null : data.getHierarchy()
}

/** A classified rectangle annotation whose class is not one of simsearch-wsi's reserved ones. */
boolean isPrototype(PathObject p) {
    String name = className(p)
    return p.isAnnotation() && name != null && name != 'background' && name != 'Rejected suggestion' &&
            p.getROI() != null && p.getROI().getRoiName() == 'Rectangle'
}

String className(PathObject p) {
    return p.getPathClass() == null ? null : p.getPathClass().toString()
}

String fixed(Object value, int digits) {
    if (!(value instanceof Number))
        return 'n/a'
    return String.format(Locale.ROOT, '%.' + digits + 'f', ((Number) value).doubleValue())
}

/** PathObjects as GeoJSON Feature maps, written by QuPath itself (GsonTools). */
List toFeatures(Collection objects) {
    if (objects.isEmpty())
        return []
    def gson = GsonTools.getInstance()
    Object parsed = gson.fromJson(gson.toJson(new ArrayList(objects)), Object.class)
    if (parsed instanceof Map)  // a single Feature or a FeatureCollection
        return ((Map) parsed).type == 'FeatureCollection' ? (List) ((Map) parsed).features : [parsed]
    return (List) parsed
}

/** GeoJSON features as QuPath objects (keeping their ids), not yet added. */
List readFeatures(List features) {
    if (features == null || features.isEmpty())
        return []
    String text = GsonTools.getInstance().toJson([type: 'FeatureCollection', features: features])
    return PathIO.readObjectsFromGeoJSON(new ByteArrayInputStream(text.getBytes(StandardCharsets.UTF_8)))
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
